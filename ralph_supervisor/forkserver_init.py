"""Imported once, by multiprocessing's fork server, before it forks workers.

The fork server shares the supervisor's process group. A SIGTERM or SIGHUP
sent to that whole group (supervisord's stopasgroup, a closed terminal,
`kill -TERM -PGID`) would kill it by default, and its death tells every
worker that the supervisor is gone (PR_SET_PDEATHSIG): calls in flight
would be lost instead of drained. The supervisor alone decides when to
stop, so the fork server ignores both; it still exits as soon as the
supervisor does, when its "alive" pipe closes. Workers set their own
handlers, and exec gives agents the default ones back.

Only the fork server imports this module (it is named in
set_forkserver_preload); importing it anywhere else would be a mistake.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)

# The workers' code, loaded once here so each fork starts warm.
import ralph_supervisor.worker  # noqa: E402, F401
