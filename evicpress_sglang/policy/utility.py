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
        t = self.table
        self._refresh(rows)
        u = np.take(self._base, rows, axis=1)  # [C, rows]: contiguous per configuration
        u[self.drop] = self.weights.alpha - t.cost.prefill_s_per_token * t.tokens[rows]
        # A counter that decayed to exactly zero (a week unused) would turn -inf into nan
        # and every utility into a tie: the smallest positive frequency keeps the order.
        u *= np.maximum(t.frequency(rows, now), np.finfo(np.float64).tiny)
        return u.T

    def _refresh(self, rows: np.ndarray) -> None:
        """Recompute the base of the rows whose inputs changed since it was computed."""
        t, w = self.table, self.weights
        inputs = (w.alpha, w.quality_floor,
                  np.array([t.cost.load_terms(c, t.layout) for c in t.configs if c.tier != Tier.DROP]).tobytes())
        if t.version.size > self._seen.size:  # the table grew: its new rows are unseen
            self._seen = np.concatenate([self._seen, np.full(t.version.size - self._seen.size, -1)])
            base = np.empty((self._base.shape[0], t.version.size))
            base[:, : self._base.shape[1]] = self._base
            self._base = base
        if inputs != self._inputs:
            self._inputs = inputs
            self._seen[:] = -1
        stale = rows[self._seen[rows] != t.version[rows]]
        if stale.size == 0:
            return
        q = t.config_quality(stale)
        base = q * w.alpha - t.load_seconds(stale)
        self._base[:, stale] = np.where(q < w.quality_floor - 1e-12, -np.inf, base).T
        self._seen[stale] = t.version[stale]
