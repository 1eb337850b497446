"""Per-context quality profiling (issue 5): the held-out queries it replays and the
scores it compares answers with."""

from .reservoir import HeldOutQueries
from .scores import AnswerSimilarity, teacher_forced, token_f1

__all__ = ["AnswerSimilarity", "HeldOutQueries", "teacher_forced", "token_f1"]
