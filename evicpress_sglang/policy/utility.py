"""The EVICPRESS utility of every context in every configuration, kept current cheaply.

    utility = (alpha * quality - load seconds) * frequency,  -inf below the quality floor

Of its terms only the frequency moves with every request. The rest, the *base*
``alpha * quality - load seconds``, moves when a context's tokens, sizes or qualities do
(the table counts those changes per row in ``ContextTable.version``), or when the weights
or the cost model's rates do. So the base is kept per context and recomputed only for
rows whose version moved since it was computed, and a re-plan costs a gather and a
multiply instead of pricing every configuration of every context again.

The drop configuration is the exception: its load time is the re-prefill of the whole
context, whose rate the server re-estimates from its own prefills every few batches. That
column is computed on every call; it is one of C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .configs import Tier
from .contexts import ContextTable

if TYPE_CHECKING:
    from .policies import Weights


class Utility:
    """``utility(rows, now)``: [rows, C] utility of ``table``'s contexts under ``weights``."""

    def __init__(self, table: ContextTable, weights: "Weights") -> None:
        self.table = table
        self.weights = weights
        self.drop = int(np.flatnonzero(table.tier_of == Tier.DROP)[0])
        self._base = np.empty((len(table.configs), 0))  # [C, table rows], configuration-major
        self._seen = np.empty(0, dtype=np.int64)  # per row, the table version the base is of
        self._inputs: tuple | None = None  # the weights and rates the base was computed with

    def __call__(self, rows: np.ndarray, now: float) -> np.ndarray:
        """[rows, C] utility of the contexts in ``rows``."""
        t = self.table
        base = self._base_of(rows)
        base[self.drop] = self.weights.alpha - t.cost.prefill_s_per_token * t.tokens[rows]
        # A counter that decayed to exactly zero (a week unused) would turn -inf into nan
        # and every utility into a tie: the smallest positive frequency keeps the order.
        base *= np.maximum(t.frequency(rows, now), np.finfo(np.float64).tiny)
        return base.T

    def _base_of(self, rows: np.ndarray) -> np.ndarray:
        """[C, rows], a fresh array: the base of ``rows``, recomputed where their inputs changed."""
        t, w = self.table, self.weights
        inputs = (w.alpha, w.quality_floor,
                  np.array([t.cost.load_terms(c, t.layout) for c in t.configs if c.tier != Tier.DROP]).tobytes())
        if t.version.size > self._seen.size:  # the table grew: its new rows are unseen
            grown = t.version.size - self._seen.size
            self._seen = np.concatenate([self._seen, np.full(grown, -1)])
            self._base = np.concatenate([self._base, np.empty((self._base.shape[0], grown))], axis=1)
        if inputs != self._inputs:
            self._inputs = inputs
            self._seen[:] = -1
        stale = self._seen[rows] != t.version[rows]
        if not stale.any():
            return np.take(self._base, rows, axis=1)
        everything = bool(stale.all())  # e.g. after a calibration: no second pass over the rows
        changed = rows if everything else rows[stale]
        q = t.config_quality(changed).T  # [C, changed]
        base = np.where(q < w.quality_floor - 1e-12, -np.inf, q * w.alpha - t.load_seconds(changed).T)
        if (np.diff(changed) == 1).all():  # a run of rows in order: a copy, not a scatter (8x faster)
            self._base[:, changed[0]: changed[-1] + 1] = base
        else:
            self._base[:, changed] = base
        self._seen[changed] = t.version[changed]
        return base if everything else np.take(self._base, rows, axis=1)
