"""selfinstruct: seed tasks in, clean synthetic instruction data out."""

__version__ = "0.1.0"
