"""Replays a request trace through the tier model under one policy.

For every request: the prefix (its context and the contexts it extends) is loaded from
wherever each part lives (or recomputed if dropped or new), the estimated TTFT is the
sum of those load times plus the query's own prefill, and the served quality is the
lowest quality along the prefix. Then the prefix is on the GPU, and the policy makes
every tier fit again, with the prefix itself held in place (it is in use).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..codecs import KVShape
from ..policy import ContextTable, CostModel, Tier, Weights, build_configs, make_policy
from ..policy.placement import depth
from ..policy.planner import Plan, build_plan
from ..settings import DEFAULT_DISK_CODECS, DEFAULT_HOST_CODECS


@dataclass
class SimResult:
    policy: str
    requests: int
    ttft_mean: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    quality_mean: float
    quality_min: float
    #: fraction of reused prefix tokens served from each place (gpu, host, disk, recomputed)
    token_hit_rate: dict[str, float] = field(default_factory=dict)
    evictions: int = 0
    bytes_loaded: dict[str, float] = field(default_factory=dict)
    #: sum over requests of alpha * served quality - TTFT (the utility the policy maximises, realised)
    utility_total: float = 0.0
    #: "sync": every eviction re-plans; "async": it applies the plan made after the previous one
    plan: str = "sync"

    def to_dict(self) -> dict:
        return asdict(self)


def layout_of(trace: dict) -> KVShape:
    m = trace.get("model", {})
    return KVShape(m.get("layers", 32), 0, m.get("heads", 8), m.get("head_dim", 128), getattr(torch, m.get("dtype", "bfloat16")))


def simulate(
    trace: dict,
    policy: str,
    capacity: tuple[float, float, float],
    cost: CostModel | None = None,
    weights: Weights | None = None,
    host_codecs: list[str] | None = None,
    disk_codecs: list[str] | None = None,
    check: bool = False,
    plan: str = "sync",
) -> SimResult:
    """Replay ``trace`` under ``policy`` with tier capacities (GPU, host, disk) in bytes.

    ``plan="async"`` models the server's background planner (:mod:`..policy.planner`): an
    eviction applies the steps that still hold of the plan made from the state after the
    previous eviction (planned to free as much as the largest of the last 8 overflows), a
    store into a tier with no room becomes a drop (as a refused put does), and what is
    still over the GPU's capacity is dropped least recently used first, among the plan's
    candidates, then among all contexts. The time budget is not modelled: every step that
    holds is applied.

    With ``check``, assert after every placement that no tier is over capacity (beyond
    what the request in flight itself needs) and that no context sits above its parent.
    """
    cost = cost or CostModel()
    layout = layout_of(trace)
    configs = build_configs(list(host_codecs or DEFAULT_HOST_CODECS), list(disk_codecs or DEFAULT_DISK_CODECS))
    table = ContextTable(configs, layout, cost)
    pol = make_policy(policy, table, weights)
    cap = np.asarray(capacity, dtype=np.float64)
    if plan not in ("sync", "async"):
        raise ValueError(f"plan must be 'sync' or 'async', got {plan!r}")
    alpha = (weights or Weights()).alpha
    ready: Plan | None = None
    overflow: deque[float] = deque(maxlen=8)

    ttfts, qualities = [], []
    tokens_from = {"gpu": 0.0, "host": 0.0, "disk": 0.0, "recomputed": 0.0}
    bytes_loaded = {"host": 0.0, "disk": 0.0}
    evictions = 0
    utility = 0.0
    for req in trace["requests"]:
        now = float(req["t"])
        key = req["context"]
        new = key not in table.row_of
        if new:
            parent = req.get("parent")
            if parent is not None and parent not in table.row_of:
                raise ValueError(f"request for {key!r} extends {parent!r}, which no earlier request created")
            table.insert(key, int(req["tokens"]), now, parent)
            for codec, q in (req.get("quality") or {}).items():
                table.set_quality(key, codec, q)
            table.set_assign(table.row_of[key], len(configs) - 1)  # new: it will be computed, like a dropped one
        path = []
        r = table.row_of[key]
        while r >= 0:
            path.append(r)
            r = table.parent[r]
        path = np.array(path[::-1])

        load = table.load_seconds(path)
        quality = table.config_quality(path)
        cfg = table.assign[path]
        ttft = float(load[np.arange(path.size), cfg].sum()) + cost.prefill_s_per_token * int(req.get("query_tokens", 0))
        q = float(quality[np.arange(path.size), cfg].min())
        ttfts.append(ttft)
        qualities.append(q)
        reused = path[:-1] if new else path  # a context's first request is a prefill, not a reuse
        for row, c in zip(reused, table.assign[reused]):
            tier = table.configs[c].tier
            label = "recomputed" if tier == Tier.DROP else tier.label
            tokens_from[label] += table.tokens[row]
            if tier in (Tier.HOST, Tier.DISK):
                bytes_loaded[tier.label] += table.sizes[row, c]

        # The prefix is on the GPU now, with the quality it was loaded at.
        table.set_present_quality(path, quality[np.arange(path.size), cfg])
        table.set_assign(path, table.gpu_config)
        for row in path:
            table.hit(table.keys[row], now)
        rows = table.rows()
        usage = _usage(table, rows)
        if np.any(usage > cap):
            if plan == "sync":
                rows, new = pol.place(cap, now, ~np.isin(rows, path))
                changed = new != table.assign[rows]
                moved, to = rows[changed], new[changed]
            else:
                overflow.append(usage[0] - cap[0])
                moved, to = _apply_plan(table, ready, cap, path)
            evictions += moved.size
            # Re-encoding caps quality at the codec's; dropping means recomputing exact KV later.
            encoded = table.config_quality(moved)[np.arange(moved.size), to]  # capped by the present quality
            table.set_present_quality(moved, np.minimum(table.present_quality[moved], encoded))
            table.set_assign(moved, to)
            if check:
                _check(table, cap, path)
            if plan == "async":  # what the background planner has ready for the next eviction
                room = cap - np.array([max(max(overflow), 0.0), 0.0, 0.0])
                rows = table.rows()
                ready = build_plan(pol, table, room, now, ~np.isin(rows, path), lru=True)
        utility += alpha * q - ttft

    t = np.array(ttfts)
    reused = max(sum(tokens_from.values()), 1.0)
    return SimResult(
        policy=policy,
        requests=len(ttfts),
        ttft_mean=float(t.mean()),
        ttft_p50=float(np.percentile(t, 50)),
        ttft_p90=float(np.percentile(t, 90)),
        ttft_p99=float(np.percentile(t, 99)),
        quality_mean=float(np.mean(qualities)),
        quality_min=float(np.min(qualities)),
        token_hit_rate={k: float(v / reused) for k, v in tokens_from.items()},
        evictions=evictions,
        bytes_loaded={k: float(v) for k, v in bytes_loaded.items()},
        utility_total=utility,
        plan=plan,
    )


def _apply_plan(table: ContextTable, plan: Plan | None, cap: np.ndarray, path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, configurations) an asynchronous eviction moves (see :func:`simulate`); the
    table is left as it was."""
    assign = table.assign.copy()
    usage = _usage(table, table.rows())
    busy = np.zeros(table.alive.size, dtype=bool)
    busy[path] = True

    def move(r: int, c: int) -> None:
        old = assign[r]
        if table.tier_of[c] in (Tier.HOST, Tier.DISK) and usage[table.tier_of[c]] + table.sizes[r, c] > cap[table.tier_of[c]]:
            c = table.drop_config  # a tier with no room refuses the blob: the context is dropped
        for cfg, sign in ((old, -1.0), (c, 1.0)):
            if table.tier_of[cfg] < Tier.DROP:
                usage[table.tier_of[cfg]] += sign * table.sizes[r, cfg]
        assign[r] = c

    def on_gpu_leaf(r: int) -> bool:
        return (table.alive[r] and not busy[r] and assign[r] == table.gpu_config
                and all(assign[c] != table.gpu_config for c in table.children(r)))

    if plan is not None:
        for i in range(plan.rows.size):
            r = plan.rows[i]
            if plan.holds(table, i) and not busy[r] and assign[r] == plan.start[i]:
                move(r, int(plan.configs[i]))
    rows = table.rows()
    everyone = rows[np.lexsort((-depth(table.parent, rows), table.last_time[rows]))]
    for r in np.concatenate([plan.lru if plan is not None else everyone[:0], everyone]):
        if usage[0] <= cap[0]:
            break
        if on_gpu_leaf(r):
            move(r, table.drop_config)
    moved = np.flatnonzero(assign != table.assign)
    return moved, assign[moved]


def _usage(table: ContextTable, rows: np.ndarray) -> np.ndarray:
    used = np.bincount(table.tier_of[table.assign[rows]], weights=table.sizes[rows, table.assign[rows]], minlength=4)
    return used[:3]


def _check(table: ContextTable, cap: np.ndarray, in_use: np.ndarray) -> None:
    rows = table.rows()
    pinned = np.zeros(3)
    pinned[0] = table.sizes[in_use, table.gpu_config].sum()
    assert np.all(_usage(table, rows) <= np.maximum(cap, pinned) + 1e-6), (_usage(table, rows), cap)
    tiers = table.tier_of[table.assign]
    has_parent = rows[table.parent[rows] >= 0]
    assert np.all(tiers[has_parent] >= tiers[table.parent[has_parent]]), "a context sits above its parent"
