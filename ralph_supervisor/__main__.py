import sys

from ralph_supervisor.cli import main

sys.exit(main())
