"""What ``/evicpress/status`` shows: policy, tiers, counters, health and the most used
contexts' placements. Everything is plain JSON: a utility of -inf (a configuration below
the quality floor) or a nan becomes null, since JSON has no such numbers."""

from __future__ import annotations

import math
import time

import numpy as np
from sglang.srt.mem_cache.radix_cache import RadixCache

from . import prefill_timer
from .guard import HOOKS


def json_safe(value):
    """``value`` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class CacheStatus(RadixCache):
    """Mixin of :class:`~.cache.EvicPressRadixCache`."""

    def _tier_bytes(self) -> dict[str, int]:
        used = {"gpu": self._gpu_tokens() * self.token_bytes}
        return used | {tier.label: store.usage().used_bytes for tier, store in self.tiers.items()}

    def status(self) -> dict:
        with self.lock:
            tiers = {"gpu": {"used_bytes": self._gpu_tokens() * self.token_bytes, "tokens": self._gpu_tokens()}}
            for tier, store in self.tiers.items():
                u = store.usage()
                tiers[tier.label] = {"used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes,
                                     "entries": u.entries, **u.counters}
            if "disk" in tiers:
                tiers["disk"]["dormant"] = sum(len(v) for v in self.dormant.values())
            if "remote" in tiers:  # reads ahead of the match (backend.prefetch)
                tiers["remote"]["prefetch"] = self.prefetch.status()
            return json_safe({
                "policy": self.settings.policy,
                "weights": {"alpha": self.settings.alpha, "quality_floor": self.settings.quality_floor},
                "tiers": tiers,
                "contexts": len(self.table),
                "planner": {"background": self._plans_in_background(),
                            "plans": 0 if self.planner is None else self.planner.plans,
                            "failed": self.planner is not None and self.planner.failed},
                "stats": self.stats.to_dict(),
                "health": self.health.to_dict() | {
                    "internal_errors": self.health.internal_errors + HOOKS.internal_errors,
                    "hook_errors": dict(HOOKS.errors_by_entry)},
                "placements": self._top_placements(self.settings.status_top),
                "profiler": self.profiling.status(),
                "cost_model": {"prefill_s_per_token": self.cost.prefill_s_per_token, "host_bw": self.cost.host_bw,
                               "disk_bw": self.cost.disk_bw, "remote_bw": self.cost.remote_bw,
                               "remote_latency": self.cost.remote_latency,
                               "prefill_learnt": prefill_timer.describe()},
            })

    def _top_placements(self, n: int) -> list[dict]:
        t = self.table
        rows = t.rows()
        if rows.size == 0 or n == 0:
            return []
        now = time.monotonic()
        freq = t.frequency(rows, now)
        top = np.argsort(-freq)[:n]
        order = rows[top]
        util = None
        if self.policy is not None and hasattr(self.policy, "utility"):
            util = self.policy.utility(order, now)
        out = []
        for i, r in enumerate(order):
            cfg = t.configs[t.assign[r]]
            out.append({"node": int(t.keys[r]), "tokens": int(t.tokens[r]), "config": cfg.label,
                        "frequency": float(freq[top[i]]),
                        "quality": float(t.present_quality[r]),
                        "held_out_queries": len(self.queries.queries(t.keys[r])),
                        "profiled_quality": self.profiling.measured(t.keys[r]),
                        "utility": None if util is None else float(util[i, t.assign[r]])})
        return out
