"""A profile job and its namespaces: what the scheduler hands the profiler, and what it keeps.

A job measures the lossy codecs on one context: variant 0 is the exact reference, then one
variant per codec, each asked in a cache namespace of its own (SGLang's ``extra_key``,
``evp-profile:<job>:<variant>``), so its requests find that variant's KV and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sglang.srt.mem_cache.radix_cache import TreeNode

from ..codecs import get_codec
from ..policy import Tier

NAMESPACE = "evp-profile:"
REFERENCE = "bf16"  # variant 0: exact KV through the identity codec


def namespace(job: int, variant: int) -> str:
    return f"{NAMESPACE}{job}:{variant}"


def parse_namespace(extra_key: str | None) -> tuple[int, int] | None:
    """(job, variant) of a profile namespace; None for anything else."""
    if not extra_key or not extra_key.startswith(NAMESPACE):
        return None
    job, _, variant = extra_key[len(NAMESPACE):].partition(":")
    try:
        return int(job), int(variant)
    except ValueError:
        return None


def lossy_codecs(table) -> list[str]:
    """The codecs whose quality needs measuring: those that decide a stored configuration's
    quality (:attr:`ContextTable.quality_codec`), lossless ones left out."""
    names = [c for c, tier in zip(table.quality_codec, table.tier_of) if tier not in (Tier.GPU, Tier.DROP)]
    return [n for n in dict.fromkeys(names) if not get_codec(n).lossless]


@dataclass
class Job:
    id: int
    node: int  # the context (radix node id) being profiled
    prefix: list[int]  # its tokens, from the root
    queries: list[list[int]]
    codecs: list[str]  # per variant; 0 is the reference
    created: float
    extra_key: str | None = None  # the context's namespace (its content key with the prefix)
    recompute: bool = False  # the reference is prefilled in its namespace, not copied from the context
    pinned: TreeNode | None = field(default=None, repr=False)  # the exact source of the copies, locked
    write_questions: int = 0  # no held-out query yet: the profiler has the model write this many
    asked_for: bool = False  # made for one context on request (not handed to the background loop)
    copy: TreeNode | None = field(default=None, repr=False)  # the staged copy it holds locked now
    last_match: dict[str, tuple[int, int]] = field(default_factory=dict)  # per request id: (variant, tokens found)
    reason: str | None = None  # its last staging refusal or taint, for status

    def served(self) -> set[int]:
        """Variants some request ran on in full."""
        return {v for v, found in self.last_match.values() if found >= len(self.prefix)}

    def tainted(self) -> set[int]:
        """Variants some request ran on only in part."""
        return {v for v, found in self.last_match.values() if found < len(self.prefix)}

    def to_dict(self) -> dict:
        return {"job": self.id, "node": self.node, "prefix": self.prefix, "queries": self.queries,
                "codecs": self.codecs, "namespaces": [namespace(self.id, i) for i in range(len(self.codecs))],
                "asked_for": self.asked_for, "write_questions": self.write_questions, "recompute": self.recompute,
                "reason": self.reason}

    def summary(self, now: float) -> dict:
        """What status shows of a running job (no tokens)."""
        return {"job": self.id, "node": self.node, "codecs": self.codecs, "age_s": round(now - self.created, 1),
                "recompute": self.recompute, "served": sorted(self.served()), "tainted": sorted(self.tainted()),
                "reason": self.reason}


@dataclass
class Record:
    """The last profile of a context."""

    when: float
    queries: int
    quality: dict[str, float]
