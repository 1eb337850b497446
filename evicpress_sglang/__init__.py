"""EVICPRESS for SGLang: joint KV-cache compression and eviction across GPU, host memory and disk."""

__version__ = "0.1.0"
