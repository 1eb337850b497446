"""Choosing one configuration per context under per-tier byte capacities.

This is a multiple-choice knapsack over three capacities (GPU, host, disk). The
EVICPRESS heuristic, implemented here vectorised over contexts:

1. every context starts at its highest-utility configuration;
2. while a tier is over capacity, apply the operation with the smallest utility loss
   per byte freed *in that tier*: compress harder in the same tier, move to a slower
   tier under any codec, or drop. A context's successive cheapest operations are the
   vertices of the lower convex hull of its (bytes in tier, utility) points, so all of
   them are computed at once and sorted, instead of rescanning after every step (the
   paper's reference implementation) or keeping a heap of Python objects;
3. cascade GPU -> host -> disk, since demotions fill the next tier;
4. repair the prefix invariant (a context is never on a faster tier than its parent,
   and is dropped if its parent is), then re-run 2-3 if the repair overfilled a tier;
5. spend capacity that step 2 freed beyond need on the upgrades that gain most.

:func:`solve_exact` enumerates every assignment of a small instance, for testing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .configs import STORED_TIERS, Tier


@dataclass
class Problem:
    """Contexts x configurations, everything the solver needs and nothing else."""

    tier_of: np.ndarray  # [C] int, tier of each configuration
    sizes: np.ndarray  # [N, C] bytes the context takes in that configuration's tier
    utility: np.ndarray  # [N, C]; -inf where a configuration is not allowed
    capacity: np.ndarray  # bytes per stored tier (GPU, host, disk, remote); missing slower tiers hold nothing
    parent: np.ndarray = field(default=None)  # [N] index of the parent context or -1
    movable: np.ndarray = field(default=None)  # [N] False: must stay where `start` puts it
    #: [N] the fastest tier each context may be placed on (an eviction never loads KV up)
    fastest: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        n = self.sizes.shape[0]
        if self.parent is None:
            self.parent = np.full(n, -1, dtype=np.int64)
        if self.movable is None:
            self.movable = np.ones(n, dtype=bool)
        if self.fastest is None:
            self.fastest = np.zeros(n, dtype=np.int64)
        self.capacity = np.pad(np.asarray(self.capacity, dtype=np.float64),
                               (0, len(STORED_TIERS) - len(self.capacity)))
        if np.any(np.diff(self.tier_of) < 0):
            raise ValueError("configurations must be ordered by tier, fastest first")

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(sizes, utility) transposed to [C, N]: the solver works one configuration at a
        time on contiguous rows, which is several times faster than [N, C] matrices."""
        if getattr(self, "_cols", None) is None:
            self._cols = (np.ascontiguousarray(self.sizes.T), np.ascontiguousarray(self.utility.T))
        return self._cols

    def by_tier(self) -> "TierBest":
        """Per tier and context, the best utility, the smallest size and the best placement
        at or below the tier (computed once per problem)."""
        if getattr(self, "_by_tier", None) is None:
            self._by_tier = TierBest.of(self)
        return self._by_tier

    def tier_configs(self) -> list[np.ndarray]:
        """Per tier, its configurations: a contiguous run, since configurations are
        ordered by tier (fastest first)."""
        if getattr(self, "_tier_configs", None) is None:
            self._tier_configs = [np.flatnonzero(self.tier_of == t) for t in range(len(Tier))]
        return self._tier_configs

    def children(self) -> np.ndarray:
        """Contexts with a parent (computed once): only they can break the prefix invariant."""
        if getattr(self, "_children", None) is None:
            self._children = np.flatnonzero(self.parent >= 0)
        return self._children

    @property
    def n(self) -> int:
        return self.sizes.shape[0]

    def best(self) -> np.ndarray:
        return self.by_tier().from_config[Tier.GPU]

    def usage(self, assign: np.ndarray) -> np.ndarray:
        """Bytes used per stored tier by an assignment."""
        sizes = _at(self.columns()[0], assign, np.arange(self.n))
        used = np.bincount(self.tier_of[assign], weights=sizes, minlength=len(Tier))
        return used[: len(STORED_TIERS)].astype(np.float64)

    def total_utility(self, assign: np.ndarray) -> float:
        return float(self.utility[np.arange(self.n), assign].sum())

    def feasible(self, assign: np.ndarray) -> bool:
        if np.any(self.usage(assign) > self.capacity + 1e-6) or np.any(self.tier_of[assign] < self.fastest):
            return False
        if not np.all(np.isfinite(self.utility[np.arange(self.n), assign])):
            return False
        return prefix_violations(self, assign).size == 0


@dataclass
class TierBest:
    """[tier, context] summaries of a :class:`Problem` that every phase of the solver needs.

    Per tier: the highest utility (-inf in tiers faster than the context may use), and the
    smallest size (a lower bound on what moving a context into the tier costs). Per tier
    ``t`` also the best configuration in tier ``t`` *or slower*, and its utility: the best
    way out of a faster tier, the best placement below a parent, and (``t`` = GPU) the best
    placement at all.
    """

    utility: np.ndarray  # -inf where the tier has no allowed configuration
    min_size: np.ndarray  # inf where the tier has no configuration
    from_utility: np.ndarray
    from_config: np.ndarray  # -1 where nothing at or below the tier is allowed

    @classmethod
    def of(cls, p: Problem) -> "TierBest":
        best_c, best_u, min_s = _tier_bests(p.tier_configs(), *p.columns())
        for t in range(1, len(Tier)):
            best_u[t - 1] = np.where(p.fastest >= t, -np.inf, best_u[t - 1])
        best_c = np.where(np.isneginf(best_u), -1, best_c)
        from_u, from_c = best_u.copy(), best_c  # the per-tier best configuration becomes the suffix best
        for t in range(len(Tier) - 2, -1, -1):
            slower = from_u[t + 1] > from_u[t]
            from_c[t] = np.where(slower, from_c[t + 1], from_c[t])
            np.maximum(from_u[t], from_u[t + 1], out=from_u[t])
        return cls(best_u, min_s, from_u, from_c)


#: lowest set bit of a byte (-1 for none): the first configuration that holds a tier's maximum
_FIRST_BIT = np.array([(m & -m).bit_length() - 1 for m in range(256)], dtype=np.int64)


def _tier_bests(tier_configs: list[np.ndarray], S: np.ndarray, U: np.ndarray):
    """Per tier and context ([tiers, N] each), from [C, N] sizes and utilities: the
    highest-utility configuration (the first on a tie; -1 where the tier has no
    configuration), its utility (-inf where none is allowed) and the smallest size (inf
    where there is no configuration).

    Which configuration holds the maximum is found as a bitmask of the tier's configurations
    equal to it, looked up in a table: several times faster than ``np.where`` per
    configuration or an ``argmax`` across the rows of a [C, N] block.
    """
    n = S.shape[1]
    best_c = np.full((len(tier_configs), n), -1, dtype=np.int64)
    best_u = np.full((len(tier_configs), n), -np.inf)
    min_s = np.full((len(tier_configs), n), np.inf)
    for t, configs in enumerate(tier_configs):
        if configs.size == 0:
            continue
        if configs.size == 1:
            best_c[t], best_u[t], min_s[t] = configs[0], U[configs[0]], S[configs[0]]
            continue
        block = slice(configs[0], configs[-1] + 1)
        S[block].min(axis=0, out=min_s[t])
        best = U[block].max(axis=0, out=best_u[t])
        first = np.zeros(n, dtype=np.int64)
        for lo in range(0, configs.size, 8)[::-1]:  # eight configurations per byte; earlier ones win
            bits = np.zeros(n, dtype=np.uint8)
            for i in range(lo, min(lo + 8, configs.size)):
                bits |= (U[configs[i]] == best).view(np.uint8) << np.uint8(i - lo)
            found = _FIRST_BIT.take(bits)
            first = np.where(found >= 0, lo + found, first)
        best_c[t] = configs[0] + first
    return best_c, best_u, min_s


def _at(matrix: np.ndarray, config: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[config, rows]`` of a [C, N] column matrix: one value per context, through
    a flat take (twice as fast as numpy's indexing with two index arrays)."""
    return matrix.ravel().take(config * matrix.shape[1] + rows)


def prefix_violations(p: Problem, assign: np.ndarray) -> np.ndarray:
    """Contexts placed on a faster tier than their parent."""
    kids = p.children()
    return kids[p.tier_of[assign[kids]] < p.tier_of[assign[p.parent[kids]]]]


def _demotion_steps(p: Problem, rows: np.ndarray, start: np.ndarray, tier: int):
    """Every context's hull walk towards fewer bytes in ``tier``, column by column.

    From its current configuration a context can go to a smaller configuration of the
    same tier (few: one per codec) or leave the tier; leaving frees everything, and the
    best way out is simply the highest-utility configuration of a slower tier, computed
    once. Returns parallel arrays (row, to_config, efficiency, bytes_freed, step_number).
    """
    S, U = p.columns()
    by = p.by_tier()
    same = p.tier_configs()[tier]
    out_u = by.from_utility[tier + 1, rows]  # -inf: no way out (nothing slower allowed)
    out_c = by.from_config[tier + 1, rows]
    cur = start.copy()
    idx = np.arange(rows.size)
    out = []
    for step in range(same.size + 1):
        r = rows[idx]
        s_cur, u_cur = _at(S, cur, r), _at(U, cur, r)
        with np.errstate(divide="ignore", invalid="ignore"):
            eff = (u_cur - out_u[idx]) / s_cur  # leaving the tier frees all of it
            to, kept = out_c[idx], np.zeros(idx.size)
            for j in same if same.size > 1 else ():  # a lone configuration has nothing smaller
                s_j = S[j, r]
                e_j = (u_cur - U[j, r]) / (s_cur - s_j)  # +inf where U is -inf: never chosen
                better = (s_j < s_cur) & (e_j < eff)
                # np.where rather than masked assignment: with a mask that differs from
                # context to context, branch-free selection is several times faster
                eff, to, kept = np.where(better, e_j, eff), np.where(better, j, to), np.where(better, s_j, kept)
        k = np.flatnonzero(np.isfinite(eff))
        if k.size == 0:
            break
        if k.size < idx.size:
            r, to, eff, kept, s_cur = r[k], to[k], eff[k], kept[k], s_cur[k]
        out.append((r, to, eff, s_cur - kept, np.full(r.size, step)))
        stay = p.tier_of[to] == tier  # still in the tier: may shrink further
        idx, cur = idx[k[stay]], to[stay]
        if idx.size == 0:
            break
    if not out:
        empty = np.empty(0)
        return empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty
    return tuple(np.concatenate(parts) for parts in zip(*out))


def _excess(p: Problem, assign: np.ndarray, tier: int) -> tuple[np.ndarray, float]:
    """(which contexts are on ``tier``, bytes by which the tier is over capacity); sums
    only the sizes of the contexts on the tier, not :meth:`Problem.usage` of all."""
    on_tier = p.tier_of[assign] == tier
    rows = np.flatnonzero(on_tier)
    return on_tier, float(_at(p.columns()[0], assign[rows], rows).sum()) - p.capacity[tier]


def _cheapest_covering(cost: np.ndarray, weight: np.ndarray, need: float) -> np.ndarray:
    """Indices, in no order, of the cheapest items by ``cost`` whose ``weight`` adds up to ``need``
    (every item if all of them fall short): every item cheaper than some threshold, and of
    the items at the threshold as many as it takes.

    Which items those are needs only the cost at the cut, not an order of the rest. Each
    round selects (introselect: ~10x faster than numpy's argsort) twice, a little below
    and a little above the count that the mean weight predicts, which splits the items
    into three runs by cost; the cut lies in one of them, usually the narrow middle one,
    the cheaper runs are taken whole and only that run is searched on. The last two
    thousand items or so are sorted.
    """
    taken = []
    live = np.arange(cost.size)
    need -= 1e-9  # a byte count that floating-point sums miss by a hair is reached
    while live.size > 2048:  # below this, numpy's sort is as fast
        m = live.size
        total = float(weight[live].sum())
        if total < need:  # all of them fall short
            break
        guess, slack = int(m * need / total), m // 16 + 16
        upto = guess + slack  # where the second selection cuts, counted in the first's items
        for k in (guess - slack, upto):
            k = min(max(k - (m - live.size), 1), live.size - 1)  # within what the first left
            part = np.argpartition(cost[live], k)
            cheap = live[part[:k]]
            got = float(weight[cheap].sum())
            if got >= need:
                live = cheap
                break
            taken.append(cheap)
            need -= got
            live = live[part[k:]]
    order = live[np.argsort(cost[live])]
    reached = np.flatnonzero(np.cumsum(weight[order]) >= need)
    taken.append(order[: reached[0] + 1] if reached.size else order)
    return np.concatenate(taken)


def _relieve(p: Problem, assign: np.ndarray, tier: int) -> None:
    """Apply the cheapest demotions (per byte) until ``tier`` fits, in place."""
    on_tier, excess = _excess(p, assign, tier)
    if excess <= 0:
        return
    rows = np.flatnonzero(on_tier & p.movable)
    row, to, eff, freed, step = _demotion_steps(p, rows, assign[rows], tier)
    if row.size == 0:  # nothing movable can shrink: the tier stays over (locked contexts)
        return
    take = _cheapest_covering(eff, freed, excess)
    # Along one context's hull the cost per byte only grows, so its taken steps are a
    # prefix of its walk, except where two of its steps cost the same and the selection
    # took one of them at the cut without the other: then the later step's target is still
    # where the whole prefix leads, and the tier only ends up a little emptier. Applying
    # the steps in step order leaves every context where its last taken step leads.
    for s in range(int(step[take].max()) + 1):
        k = take[step[take] == s]
        assign[row[k]] = to[k]


def _repair_prefixes(p: Problem, assign: np.ndarray) -> bool:
    """Demote children placed above their parent to their best allowed configuration."""
    changed = False
    for _ in range(p.n):  # one pass per tree level at most
        bad = prefix_violations(p, assign)
        if bad.size == 0:
            break
        floor = p.tier_of[assign[p.parent[bad]]]
        assign[bad] = _at(p.by_tier().from_config, floor, bad)
        changed = True
    return changed


def _fill_up(p: Problem, assign: np.ndarray, rounds: int = 2) -> None:
    """Upgrade contexts into capacity left free, largest gain first, in vectorised rounds.

    Only moves to the same or a faster tier, and never above the parent's tier, so the
    prefix invariant holds (a parent's own upgrade only makes it faster). Within a round
    each tier's free bytes are shared out by descending gain; bytes a context releases by
    leaving a tier become usable in the next round (two rounds reach nearly all the gain).
    A context is only priced in a tier where the tier's best configuration beats what it
    has found so far and the tier's smallest configuration fits: after a relief most
    tiers are nearly full, and that skips most of the work.
    """
    S, U = p.columns()
    by = p.by_tier()
    free = np.append(p.capacity - p.usage(assign), np.inf)  # indexed by tier; DROP is unbounded
    best_u = by.from_utility[Tier.GPU]
    every = np.arange(p.n)
    for _ in range(rounds):
        # over every context (most are below their best after a relief): no gathers by a subset
        u_cur, own, cur_t = _at(U, assign, every), _at(S, assign, every), p.tier_of[assign]
        below_best = p.movable & (u_cur < best_u)
        if not below_best.any():
            return
        parent_t = np.append(cur_t, 0)[p.parent]  # no parent (-1): the last entry, GPU
        gain = np.zeros(p.n)  # only gains above zero count
        choice = np.full(p.n, -1, dtype=np.int64)
        add = np.zeros(p.n)
        for t, configs in enumerate(p.tier_configs()):
            # a context already in a tier of one configuration cannot gain inside it: only
            # slower ones can (none for the drop tier, the slowest)
            entry = t if configs.size > 1 else t + 1
            if configs.size == 0 or entry > Tier.DROP:
                continue
            room = free[t] + 1e-9
            here = cur_t == t  # a move within the tier costs only the difference: its smallest always fits
            i = np.flatnonzero(below_best & (cur_t >= entry) & (parent_t <= t) & (by.utility[t] - u_cur > gain)
                               & (here | (by.min_size[t] <= room)))
            own_here = np.where(here[i], own[i], 0.0)
            for j in configs:
                extra = S[j, i] - own_here
                g = U[j, i] - u_cur[i]
                better = (g > gain[i]) & (extra <= room)
                k = i[better]
                gain[k], choice[k], add[k] = g[better], j, extra[better]
        cand = np.flatnonzero(choice >= 0)
        if cand.size == 0:
            return
        to_t = p.tier_of[choice[cand]]
        take = np.ones(cand.size, dtype=bool)
        over = np.bincount(to_t, weights=add[cand], minlength=free.size) - free
        for t in np.flatnonzero(over > 1e-9):  # the smallest gains that overflow a tier wait for the next round
            m = np.flatnonzero(to_t == t)
            take[m[_cheapest_covering(gain[cand[m]], add[cand[m]], over[t])]] = False
        if not take.any():
            return
        k = cand[take]
        free -= np.bincount(to_t[take], weights=add[k], minlength=free.size)
        leaving = cur_t[k] != to_t[take]
        free += np.bincount(cur_t[k][leaving], weights=own[k][leaving], minlength=free.size)
        assign[k] = choice[k]


def _cascade(p: Problem, assign: np.ndarray, relieve) -> None:
    """Relieve every tier fastest first, repair prefixes, and again if the repair overfilled one."""
    for _ in range(len(STORED_TIERS) + 2):
        for tier in STORED_TIERS:
            relieve(p, assign, tier)
        if not _repair_prefixes(p, assign):
            break


def _lock_prefixes(p: Problem) -> None:
    """A prefix of a context in use is in use too (SGLang locks the whole path)."""
    up = p.parent[~p.movable]
    while (up := up[up >= 0]).size:
        up = up[p.movable[up]]
        p.movable[up] = False
        up = p.parent[up]


def _start(p: Problem, start: np.ndarray | None) -> np.ndarray:
    _lock_prefixes(p)
    if start is None:
        return p.best().copy()  # the solver assigns in place; the best stays as it is
    assign = start.copy()  # a movable context whose configuration is no longer allowed restarts at its best
    lost = p.movable & ~np.isfinite(p.utility[np.arange(p.n), assign])
    assign[lost] = p.best()[lost]
    return assign


def solve(p: Problem, start: np.ndarray | None = None) -> np.ndarray:
    """The EVICPRESS heuristic; returns a configuration index per context.

    ``start`` (default: every context at its best configuration) is where contexts are
    now; contexts with ``movable`` False keep their start configuration.
    """
    assign = _start(p, start)
    _cascade(p, assign, _relieve)
    _fill_up(p, assign)
    return assign


def solve_ordered(p: Problem, start: np.ndarray, victim_order: np.ndarray, next_config: np.ndarray) -> np.ndarray:
    """Baseline placement: evict in a fixed order (e.g. least recently used first), each
    victim moving one step down a fixed chain (``next_config[c]``)."""

    def relieve(p: Problem, assign: np.ndarray, tier: int) -> None:
        on_tier, excess = _excess(p, assign, tier)
        if excess <= 0:
            return
        victims = victim_order[(on_tier & p.movable)[victim_order]]
        cum = np.cumsum(p.sizes[victims, assign[victims]])
        take = victims[: int(np.searchsorted(cum, excess - 1e-9)) + 1]
        assign[take] = next_config[assign[take]]

    assign = _start(p, start)
    _cascade(p, assign, relieve)
    return assign


def depth(parent: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Distance of each context (of ``rows``, default all) from its root."""
    cur = parent.copy() if rows is None else parent[rows]
    d = np.zeros(cur.size, dtype=np.int64)
    while np.any(cur >= 0):
        up = cur >= 0
        d += up
        cur[up] = parent[cur[up]]
    return d


def solve_exact(p: Problem, max_combinations: int = 2_000_000) -> np.ndarray | None:
    """The optimal assignment by enumeration (small instances only); None if infeasible."""
    options = [np.flatnonzero(np.isfinite(p.utility[i]) & (p.tier_of >= p.fastest[i])) for i in range(p.n)]
    if np.prod([len(o) for o in options], dtype=np.float64) > max_combinations:
        raise ValueError("instance too large to enumerate")
    combos = np.array(list(itertools.product(*options)), dtype=np.int64).reshape(-1, p.n)
    rows = np.arange(p.n)[None, :]
    util = p.utility[rows, combos].sum(axis=1)
    ok = np.ones(len(combos), dtype=bool)
    tiers = p.tier_of[combos]
    sizes = p.sizes[rows, combos]
    for t in STORED_TIERS:
        ok &= np.where(tiers == t, sizes, 0).sum(axis=1) <= p.capacity[t] + 1e-6
    for i in np.flatnonzero(p.parent >= 0):
        ok &= tiers[:, i] >= tiers[:, p.parent[i]]
    if not ok.any():
        return None
    util[~ok] = -np.inf
    return combos[int(np.argmax(util))]


__all__ = ["Problem", "Tier", "depth", "prefix_violations", "solve", "solve_exact", "solve_ordered"]
