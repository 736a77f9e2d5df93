"""`python -m bench`: see bench/cli.py and bench/README.md.

The work starts only under the __main__ guard: the supervisor's workers
come from a fork server, and a module that started the benchmark on import
would start it again in every process that imports it.
"""

import sys

if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main())
