"""ralph-supervisor: a production runtime for Ralph loops on the Q Developer CLI."""

__version__ = "0.1.0"
