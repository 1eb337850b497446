"""Per-context quality profiling (issue 5): so far, the held-out queries it will replay."""

from .reservoir import HeldOutQueries

__all__ = ["HeldOutQueries"]
