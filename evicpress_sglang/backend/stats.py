"""Counters the cache keeps for ``/evicpress/status`` and Prometheus.

Seconds (evict, encode, load) are the scheduler thread's own: the copies and kernels they
queue run on the GPU afterwards, overlapped with forward passes where possible.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

#: Upper bounds (seconds) of the load-back latency histogram buckets.
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
#: Upper bounds (ms) of the eviction-time histograms: cumulative counts, so that a bench can
#: subtract two statuses and read the percentiles of what happened in between.
EVICT_BUCKETS_MS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 25.0, 50.0, 100.0, 250.0,
                    1000.0, float("inf"))


#: What a step of eviction did (:meth:`Stats.step`): a plan's store to a tier, recompression of a
#: stored context, drop; the LRU fallback's drops among the plan's GPU contexts; and SGLang's own
#: LRU eviction when all that freed too little (it visits every evictable leaf).
STEP_KINDS = ("store", "restore", "drop", "fallback_drop", "stock_lru")


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """The histogram bucket of ``value``: the first whose upper bound is at least it."""
    return bisect_left(bounds, value)


@dataclass
class Stats:
    hits: dict = field(default_factory=lambda: defaultdict(int))  # "tier:codec" -> loads
    hit_tokens: dict = field(default_factory=lambda: defaultdict(int))  # tier -> tokens loaded back
    misses: dict = field(default_factory=lambda: defaultdict(int))  # tier -> blobs lost (damaged/missing)
    stores: dict = field(default_factory=lambda: defaultdict(int))  # "tier:codec" -> blobs written
    raw_bytes_stored: int = 0
    stored_bytes: int = 0
    bytes_loaded: dict = field(default_factory=lambda: defaultdict(int))  # tier -> bytes read
    dropped: int = 0
    tier_errors: int = 0
    published: int = 0  # contexts offered to the shared store
    shared_hits: int = 0  # contexts another server published, attached here
    found_by_content: int = 0  # stored contexts attached to the tree when a request continued with them
    stale_load_backs: int = 0  # load-backs refused because the tree changed since the match
    verify_mismatches: int = 0  # only counted with the `verify` setting
    evict_seconds: float = 0.0
    #: the scheduler thread's time in each of the last evictions (status: p50/p99/max), and
    #: the part of it spent waiting for the cache's lock (held by the planner's snapshot)
    evict_times: deque = field(default_factory=lambda: deque(maxlen=4096))
    evict_waits: deque = field(default_factory=lambda: deque(maxlen=4096))
    evict_hist: list = field(default_factory=lambda: [0] * len(EVICT_BUCKETS_MS))
    evict_wait_hist: list = field(default_factory=lambda: [0] * len(EVICT_BUCKETS_MS))
    #: per step kind, the histogram of each step's time: what an eviction's time is made of
    step_hist: dict = field(default_factory=lambda: {k: [0] * len(EVICT_BUCKETS_MS) for k in STEP_KINDS})
    #: applying plans: steps carried out, stale steps skipped, stops at the time budget,
    #: evictions that found no current plan, contexts dropped by the LRU fallback
    plan: dict = field(default_factory=lambda: dict.fromkeys(
        ("steps", "stale_steps", "budget_stops", "missing", "fallback_drops"), 0))
    encode_seconds: float = 0.0
    load_hist: list = field(default_factory=lambda: [0] * len(LOAD_BUCKETS))
    load_seconds_sum: float = 0.0
    last_miss: str | None = None
    exporter: object = None  # a PrometheusExporter when SGLang runs with --enable-metrics

    def stored(self, tier: str, codec: str, tokens: int, raw_bytes: int, nbytes: int, seconds: float) -> None:
        self.stores[f"{tier}:{codec}"] += 1
        self.raw_bytes_stored += raw_bytes
        self.stored_bytes += nbytes
        self.encode_seconds += seconds
        if self.exporter is not None:
            self.exporter.stored(tier, codec, self.compression_ratio)

    def evicted(self, seconds: float, waited: float = 0.0) -> None:
        self.evict_seconds += seconds
        self.evict_times.append(seconds)
        self.evict_waits.append(waited)
        self.evict_hist[_bucket(EVICT_BUCKETS_MS, seconds * 1e3)] += 1
        self.evict_wait_hist[_bucket(EVICT_BUCKETS_MS, waited * 1e3)] += 1

    def step(self, kind: str, seconds: float) -> None:
        """One step of an eviction (``kind`` one of :data:`STEP_KINDS`) took ``seconds``."""
        self.step_hist[kind][_bucket(EVICT_BUCKETS_MS, seconds * 1e3)] += 1

    def forget_evictions(self) -> None:
        """Start the recent-evictions windows afresh (``/flush_cache``: a new run); the
        cumulative histograms keep counting."""
        self.evict_times.clear()
        self.evict_waits.clear()

    def evict_ms(self, waits: bool = False) -> dict:
        """p50, p99 and max of the recent evictions' scheduler time (or of their wait for the
        lock), in ms."""
        t = np.asarray(self.evict_waits if waits else self.evict_times) * 1e3
        if t.size == 0:
            return {"n": 0}
        return {"n": int(t.size), "p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99)),
                "max": float(t.max())}

    def loaded(self, tier: str, codec: str, tokens: int, nbytes: int, seconds: float) -> None:
        self.hits[f"{tier}:{codec}"] += 1
        self.hit_tokens[tier] += tokens
        self.bytes_loaded[tier] += nbytes
        self.load_seconds_sum += seconds
        self.load_hist[_bucket(LOAD_BUCKETS, seconds)] += 1
        if self.exporter is not None:
            self.exporter.loaded(tier, codec, tokens, seconds)

    def miss(self, tier: str, why: str) -> None:
        self.misses[tier] += 1
        self.last_miss = why
        if self.exporter is not None:
            self.exporter.miss(tier)

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes_stored / self.stored_bytes if self.stored_bytes else 1.0

    def to_dict(self) -> dict:
        return {
            "hits": dict(self.hits), "hit_tokens": dict(self.hit_tokens), "misses": dict(self.misses),
            "stores": dict(self.stores), "compression_ratio": self.compression_ratio,
            "raw_bytes_stored": self.raw_bytes_stored, "stored_bytes": self.stored_bytes,
            "bytes_loaded": dict(self.bytes_loaded), "dropped": self.dropped, "tier_errors": self.tier_errors,
            "verify_mismatches": self.verify_mismatches, "stale_load_backs": self.stale_load_backs,
            "found_by_content": self.found_by_content, "published": self.published, "shared_hits": self.shared_hits,
            "evict_seconds": self.evict_seconds, "evict_ms": self.evict_ms(), "evict_wait_ms": self.evict_ms(waits=True),
            "evict_hist": {"buckets_ms": [str(b) for b in EVICT_BUCKETS_MS], "counts": list(self.evict_hist),
                           "wait_counts": list(self.evict_wait_hist),
                           "steps": {k: list(h) for k, h in self.step_hist.items()}},
            "plan": dict(self.plan),
            "encode_seconds": self.encode_seconds,
            "load_latency": {"buckets": [str(b) for b in LOAD_BUCKETS], "counts": list(self.load_hist),
                             "sum_seconds": self.load_seconds_sum},
            "last_miss": self.last_miss,
        }
