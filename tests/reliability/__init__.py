"""The reliability suite: the promises of ralph-supervisor, under faults."""
