"""Eviction policies, chosen by name.

* ``evicpress``: the joint compression x placement heuristic over the utility
  ``(alpha * quality - load_seconds) * frequency`` with a hard quality floor.
* ``lru``: stock SGLang; the least recently used context is dropped.
* ``lru-offload``: SGLang HiCache style; least recently used moves down
  GPU -> host -> disk -> dropped, uncompressed.
* ``static:<codec>``: like ``lru-offload``, but every evicted context is stored with one
  codec (the paper's fixed-ratio compression baseline).

Every policy sees the same :class:`ContextTable` and capacities and returns a new
configuration per context, so they can be swapped at runtime and compared in one
simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .configs import Tier
from .contexts import ContextTable
from .placement import Problem, depth, solve, solve_ordered
from .utility import Utility


class PolicyError(ValueError):
    """A policy name or weight that cannot be used."""


@dataclass
class Weights:
    """The operator's knobs for ``evicpress``."""

    alpha: float = 2.0  # seconds of TTFT that one unit of quality (1.0 = exact) is worth
    quality_floor: float = 0.9  # never choose a configuration predicted below this quality

    def validate(self) -> None:
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise PolicyError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not 0.0 <= self.quality_floor <= 1.0:
            raise PolicyError(f"quality_floor must be in [0, 1], got {self.quality_floor!r}")


class Policy(ABC):
    name: str
    #: whether placements depend on the profiled qualities (if not, profiling is not worth its GPU time)
    uses_quality: bool = False

    def __init__(self, table: ContextTable) -> None:
        self.table = table

    @abstractmethod
    def allowed(self) -> np.ndarray:
        """[C] bool: configurations this policy may use."""

    @abstractmethod
    def place(self, capacity: np.ndarray, now: float, movable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, configuration per row) fitting ``capacity`` (bytes of GPU, host, disk, remote;
        tiers left off the end have none).

        ``movable`` ([table.rows()] bool, default all) marks contexts that may change
        configuration. Only resident (not dropped) rows are returned.
        """

    def _resident(self, movable: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows whose KV exists somewhere (and their movable flags). A dropped context has
        no KV to place until a request recomputes it, so it takes no part in placement."""
        rows = self.table.rows()
        keep = self.table.tier_of[self.table.assign[rows]] != Tier.DROP
        return rows[keep], (None if movable is None else movable[keep])

    def _problem(self, rows: np.ndarray, sizes: np.ndarray, utility: np.ndarray, capacity, movable) -> Problem:
        """The placement problem over ``rows`` (``sizes``: their ``config_sizes``)."""
        t = self.table
        local = np.full(t.alive.size + 1, -1, dtype=np.int64)  # the last entry: where parent -1 leads
        local[rows] = np.arange(rows.size)
        # Eviction only moves KV down: going up would mean loading it, which happens when
        # a request uses it, not when space is made.
        fastest = t.tier_of[t.assign[rows]]
        return Problem(t.tier_of, sizes, utility, np.asarray(capacity, dtype=np.float64), local[t.parent[rows]],
                       movable, fastest)


class EvicPressPolicy(Policy):
    name = "evicpress"
    uses_quality = True

    def __init__(self, table: ContextTable, weights: Weights | None = None) -> None:
        super().__init__(table)
        self.weights = weights or Weights()
        self.weights.validate()
        self._utility = Utility(table, self.weights)

    def allowed(self) -> np.ndarray:
        return np.ones(len(self.table.configs), dtype=bool)

    def utility(self, rows: np.ndarray, now: float) -> np.ndarray:
        """[rows, C] utility; -inf for configurations under the quality floor."""
        return self._utility(rows, now)

    def place(self, capacity, now, movable=None):
        rows, movable = self._resident(movable)
        p = self._problem(rows, self.table.config_sizes(rows), self.utility(rows, now), capacity, movable)
        return rows, solve(p, start=self.table.assign[rows])


class ChainPolicy(Policy):
    """Evicts least recently used first, one step down a fixed chain of configurations."""

    def __init__(self, table: ContextTable, name: str, chain_labels: list[str]) -> None:
        super().__init__(table)
        self.name = name
        labels = [c.label for c in table.configs]
        missing = [lab for lab in chain_labels if lab not in labels]
        if missing:
            raise PolicyError(f"policy {self.name!r} needs configurations {missing}, not enabled here; have {labels}")
        self.chain = [labels.index(lab) for lab in chain_labels]
        self._next = np.arange(len(labels))
        for a, b in zip(self.chain, self.chain[1:]):
            self._next[a] = b
        self._rank = np.full(len(labels), -np.inf)
        self._rank[self.chain] = -np.arange(len(self.chain), dtype=np.float64)  # faster is better

    def allowed(self) -> np.ndarray:
        return np.isfinite(self._rank)

    def place(self, capacity, now, movable=None):
        t = self.table
        rows, movable = self._resident(movable)
        utility = np.broadcast_to(self._rank, (rows.size, self._rank.size)).copy(order="F")
        p = self._problem(rows, self.table.config_sizes(rows), utility, capacity, movable)
        # least recently used first; among equals (a prefix and its continuation), the deeper one
        order = np.lexsort((-depth(p.parent), t.last_time[rows]))
        start = t.assign[rows].copy()
        start[~self.allowed()[start]] = self.chain[0]  # e.g. after switching from another policy
        return rows, solve_ordered(p, start, order, self._next)


def policy_names() -> list[str]:
    return ["evicpress", "lru", "lru-offload", "static:<codec>"]


def _offload_chain(table: ContextTable, name: str, codec: str) -> ChainPolicy:
    """GPU -> host -> disk -> remote -> dropped, storing with one codec wherever it is enabled."""
    labels = {c.label for c in table.configs}
    stored = [f"{t}:{codec}" for t in ("host", "disk", "remote") if f"{t}:{codec}" in labels]
    if not stored:
        enabled = sorted({c.codec for c in table.configs if c.tier not in (Tier.GPU, Tier.DROP)})
        raise PolicyError(f"policy {name!r}: codec {codec!r} is enabled on no tier; enabled codecs: {enabled}")
    return ChainPolicy(table, name, ["gpu", *stored, "drop"])


def make_policy(name: str, table: ContextTable, weights: Weights | None = None) -> Policy:
    """The policy called ``name`` over ``table``; a :class:`PolicyError` lists valid names."""
    name = name.strip()
    if name == "evicpress":
        return EvicPressPolicy(table, weights)
    if name == "lru":
        return ChainPolicy(table, name, ["gpu", "drop"])
    if name == "lru-offload":
        return _offload_chain(table, name, "bf16")
    if name.startswith("static:") and name != "static:":
        return _offload_chain(table, name, name.removeprefix("static:"))
    raise PolicyError(f"unknown policy {name!r}; valid: {', '.join(policy_names())}")
