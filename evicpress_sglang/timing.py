"""Timing a piece of device work the same way everywhere."""

from __future__ import annotations

import time

import torch


def best_seconds(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (the least disturbed), GPU work included."""
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
