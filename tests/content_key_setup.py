"""Shared by test_content_keys.py and disk_worker.py: documents under one system prompt,
and a cache whose evictions go straight to disk, losslessly."""

from evicpress_sglang.settings import Settings

SYSTEM = list(range(1, 41))  # a chat template's system prompt: every context's parent
DOCS = [list(range(10_000 + 1000 * i, 10_000 + 1000 * i + 60 + 7 * i)) for i in range(12)]
TOKEN_BYTES = 2 * 4 * 2 * 64 * 2


def settings(disk_dir, **kw) -> Settings:
    return Settings(**({"policy": "lru-offload", "host_bytes": 0, "disk_dir": str(disk_dir),
                        "disk_bytes": 10**8, "disk_codecs": ["bf16", "bf16+zstd"]} | kw))
