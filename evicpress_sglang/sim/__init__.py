"""Trace generation and replay: study policies without a GPU."""

from .simulator import SimResult, simulate
from .workload import ModelSpec, footprint_tokens, generate, load, save

__all__ = ["ModelSpec", "SimResult", "footprint_tokens", "generate", "load", "save", "simulate"]
