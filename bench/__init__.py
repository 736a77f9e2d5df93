"""The benchmark suite: ralph-supervisor measured the way its users will judge it.

    python -m bench [--quick | --smoke] [--out DIR] [--only NAME,...]

    cli.py         arguments, the run, the table, the files
    context.py     sizes of a run (full, quick, smoke) and what scenarios share
    scenarios/     one module per scenario, each with its rows
    callers.py     the ways of calling an agent, and the load drivers
    agents.py      the simulator, the zero-latency C agent, bench configurations
    processes.py   memory and CPU of the process tree; leftovers
    stats.py       percentiles, and the spread of repeated runs
    report.py      rows, the table, JSON and Markdown
    plot.py        the PNG (matplotlib, optional)
    machine.py     what it ran on
    zero_agent.c   the zero-latency agent, compiled at run time

scale.py, beside these, is a separate model of many supervisors sharing one
Redis (python -m bench.scale); its figures are not in this table.

bench/README.md explains each scenario and how to read the table.
"""
