"""Prometheus export of the cache's counters (SGLang's ``/metrics``, with ``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode, so metrics made here in the
scheduler process appear on the HTTP server's ``/metrics``. prometheus_client must be
imported after SGLang has set ``PROMETHEUS_MULTIPROC_DIR``, hence the late import.
"""

from __future__ import annotations

from .stats import LOAD_BUCKETS


class PrometheusExporter:
    def __init__(self, labels: dict[str, str] | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.labels = labels or {}
        names = list(self.labels)
        self.hits = Counter("evicpress_loads_total", "Contexts loaded back to the GPU, by tier and codec",
                            names + ["tier", "codec"])
        self.hit_tokens = Counter("evicpress_loaded_tokens_total", "Tokens loaded back, by tier", names + ["tier"])
        self.misses = Counter("evicpress_misses_total", "Stored contexts lost (damaged or missing blob), by tier",
                              names + ["tier"])
        self.stores = Counter("evicpress_stores_total", "Contexts stored in a lower tier, by tier and codec",
                              names + ["tier", "codec"])
        self.tier_bytes = Gauge("evicpress_tier_bytes", "Bytes held per tier", names + ["tier"],
                                multiprocess_mode="mostrecent")
        self.ratio = Gauge("evicpress_compression_ratio", "Uncompressed / stored bytes of everything stored",
                           names, multiprocess_mode="mostrecent")
        self.internal_errors = Counter("evicpress_internal_errors_total",
                                       "Exceptions of the cache answered as a miss or stock behaviour, by entry point",
                                       names + ["entry"])
        self.load_seconds = Histogram("evicpress_load_seconds", "Load-back latency per context", names,
                                      buckets=[b for b in LOAD_BUCKETS if b != float("inf")])

    def stored(self, tier: str, codec: str, ratio: float) -> None:
        self.stores.labels(**self.labels, tier=tier, codec=codec).inc()
        (self.ratio.labels(**self.labels) if self.labels else self.ratio).set(ratio)

    def loaded(self, tier: str, codec: str, tokens: int, seconds: float) -> None:
        self.hits.labels(**self.labels, tier=tier, codec=codec).inc()
        self.hit_tokens.labels(**self.labels, tier=tier).inc(tokens)
        (self.load_seconds.labels(**self.labels) if self.labels else self.load_seconds).observe(seconds)

    def miss(self, tier: str) -> None:
        self.misses.labels(**self.labels, tier=tier).inc()

    def internal_error(self, entry: str) -> None:
        self.internal_errors.labels(**self.labels, entry=entry).inc()

    def usage(self, tier_bytes: dict[str, int]) -> None:
        for tier, used in tier_bytes.items():
            self.tier_bytes.labels(**self.labels, tier=tier).set(used)
