"""The table of cached contexts the policy decides for, kept as numpy columns.

One row per context (a cached prefix; in SGLang a radix-tree node). Rows are
allocated from a free list and grown geometrically, so inserting, hitting and
removing a context are O(1) and a full re-plan reads contiguous arrays. The
[rows, configurations] matrices are stored configuration-major (Fortran order):
the solver works one configuration at a time over all contexts, so that is the
order it reads them in.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ..codecs import KVShape, drops_tokens, get_codec, subset_codec
from ..codecs.drop import TokenSelector
from .configs import Config, Tier
from .cost import CostModel

#: Quality assumed for a codec before the profiler has measured it on a context:
#: deliberately pessimistic, so unprofiled contexts are compressed only when it pays.
PRIOR_QUALITY = {"bf16": 1.0, "fp8": 0.97, "int8": 0.98, "int4": 0.93, "int2": 0.75, "zstd": 1.0}
#: Quality lost per unit of drop ratio, before profiling: half the ratio for the
#: key-scored selectors, more for a fixed window that ignores content. The query-aware
#: selectors get the key-scored prior: measured on the GPU they lose a little more than
#: keydiff (bench/results/2026-12-02-selectors), well within this conservative prior.
PRIOR_DROP_LOSS = {"knorm": 0.5, "keydiff": 0.5, "streaming": 0.7, "expected": 0.5, "kvzip": 0.5}
#: Once the profiler has measured a codec on some contexts, unprofiled contexts assume the
#: mean of those measurements, shrunk towards the conservative prior as if the prior were
#: this many measurements (one lucky context does not make a codec look safe).
PRIOR_WEIGHT = 2.0


def prior_quality(codec: str | None) -> float:
    """The product of the codec's stages' priors (a dropping stage then a quantizer)."""
    if codec is None:
        return 1.0
    q = 1.0
    for stage in codec.split("+"):
        name, _, ratio = stage.partition(":")
        q *= 1.0 - PRIOR_DROP_LOSS.get(name, 1.0) * float(ratio) if ratio else PRIOR_QUALITY.get(stage, 0.5)
    return max(q, 0.0)


#: Every per-row column (grown together; a planner's snapshot copies the rows whose
#: ``touched`` count moved since its last refresh). ``touched`` comes first and every writer
#: bumps it after writing: a write that races a refresh (``set_in_use`` runs in SGLang's
#: lock-ref walk, outside the cache's lock) is then either copied whole or seen as moved by
#: the next refresh, never half-copied and forgotten.
_COLUMNS = ("touched", "alive", "version", "_tokens", "parent", "freq", "last_time", "_assign", "_present_quality",
            "profiled", "_in_use", "_sizes", "_quality")


def _read_only(column: str, doc: str) -> property:
    def view(self: "ContextTable") -> np.ndarray:
        v = getattr(self, column).view()
        v.flags.writeable = False
        return v
    return property(view, doc=doc)


class ContextTable:
    """Per-context state: size per configuration, quality, frequency, placement.

    What the utility of a context depends on besides its frequency (its tokens, sizes,
    quality per configuration, present quality) is written only through methods, which
    count each row's changes in ``version``: the policy keeps per context what it derives
    from them and recomputes it only for rows whose version moved. Every change of any
    column of a row also counts in ``touched``, so that a planner's snapshot is refreshed
    row by row under the owner's lock in O(rows changed), not O(table). The columns others
    read (placement, lock state, sizes...) are read-only views: a direct write raises
    instead of going unnoticed.
    """

    tokens = _read_only("_tokens", "[row] tokens of the context (what a re-prefill costs)")
    sizes = _read_only("_sizes", "[row, C] bytes the context takes in each configuration")
    quality = _read_only("_quality", "[row, C] quality in each configuration (measured, or the prior)")
    present_quality = _read_only("_present_quality", "[row] quality of the KV as it is now (1.0 = exact)")
    assign = _read_only("_assign", "[row] index of the configuration the context is in now")
    in_use = _read_only("_in_use", "[row] a request holds it (SGLang: lock_ref > 0): it may not move")

    def __init__(self, configs: list[Config], layout: KVShape, cost: CostModel, half_life_s: float = 600.0) -> None:
        self.configs = configs
        self.tier_of = np.array([c.tier for c in configs], dtype=np.int64)
        self.gpu_config = next(i for i, c in enumerate(configs) if c.tier == Tier.GPU)
        self.drop_config = next(i for i, c in enumerate(configs) if c.tier == Tier.DROP)
        self.layout = layout  # layers/heads/head_dim/dtype of the model; tokens ignored
        self.cost = cost
        self.half_life_s = half_life_s
        cap = 16
        self.keys: list[object] = [None] * cap
        self.row_of: dict[object, int] = {}
        self._children: dict[int, set[int]] = {}  # row -> rows whose parent it is (removal is O(children))
        self._free: list[int] = list(range(cap - 1, -1, -1))
        c = len(configs)
        self.alive = np.zeros(cap, dtype=bool)
        self.version = np.zeros(cap, dtype=np.int64)  # changes of the row's utility inputs
        self.touched = np.zeros(cap, dtype=np.int64)  # changes of anything in the row (snapshot refresh)
        self._tokens = np.zeros(cap, dtype=np.int64)
        self.parent = np.full(cap, -1, dtype=np.int64)
        self.freq = np.zeros(cap)  # decayed hit count at `last_time`
        self.last_time = np.zeros(cap)
        self._assign = np.zeros(cap, dtype=np.int64)
        self._present_quality = np.ones(cap)  # quality of the KV as it is now (1.0 = exact)
        self._sizes = np.zeros((cap, c), order="F")
        self._quality = np.ones((cap, c), order="F")
        self.profiled = np.zeros(cap, dtype=bool)
        self._in_use = np.zeros(cap, dtype=bool)
        #: per configuration, the codec that decides its quality (a lossless +zstd stage does not)
        device = [None if c.codec is None else get_codec(c.codec).device_codec for c in configs]
        self.quality_codec = [None if d is None else d.name for d in device]
        self._prior_row = np.array([prior_quality(c) for c in self.quality_codec])
        self._learnt: dict[str, tuple[float, int]] = {}  # codec -> (sum, count) of measured qualities
        #: the token-dropping configurations, and what a context too short to drop from
        #: (``TokenSelector.MIN_TOKENS``) gets in each instead: its inner quantizer's quality,
        #: from that quantizer's own column where one is configured, else its prior
        self._dropping = np.array([d is not None and drops_tokens(d) for d in device])
        inner = [d.inner.name if dropping else None for d, dropping in zip(device, self._dropping)]
        self._inner_col = np.array([self.quality_codec.index(n) if n is not None and n in self.quality_codec else -1
                                    for n in inner])
        self._inner_prior = np.array([prior_quality(n) for n in inner])

    # -- rows -------------------------------------------------------------------

    def _grow(self) -> None:
        old = self.alive.size
        for name in _COLUMNS:
            arr = getattr(self, name)
            fill = -1 if name == "parent" else (1 if name in ("_present_quality", "_quality") else 0)
            grown = np.full((2 * old,) + arr.shape[1:], fill, dtype=arr.dtype, order="F")
            grown[:old] = arr
            setattr(self, name, grown)
        self.keys.extend([None] * old)
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def insert(self, key: object, tokens: int, now: float, parent: object | None = None) -> int:
        """A context newly cached on the GPU (exact KV); counts as one hit."""
        if key in self.row_of:
            raise KeyError(f"context {key!r} is already in the table")
        if not self._free:
            self._grow()
        r = self._free.pop()
        self.keys[r] = key
        self.row_of[key] = r
        self.alive[r] = True
        self.parent[r] = self.row_of[parent] if parent is not None else -1
        if parent is not None:
            self._children.setdefault(int(self.parent[r]), set()).add(r)
        self.freq[r] = 1.0
        self.last_time[r] = now
        self._assign[r] = self.gpu_config
        self._present_quality[r] = 1.0
        self.profiled[r] = False
        self._in_use[r] = False
        self._quality[r] = self._prior_row
        self._set_tokens(r, tokens)  # touches the row
        return r

    def set_present_quality(self, rows: np.ndarray | int, quality: np.ndarray | float) -> None:
        """The KV of ``rows`` now has this quality (1.0: exact again, e.g. recomputed)."""
        self._present_quality[rows] = quality
        self.version[rows] += 1
        self.touched[rows] += 1

    def set_assign(self, rows: np.ndarray | int, config: np.ndarray | int) -> None:
        """``rows`` are now in configuration ``config`` (an index into :attr:`configs`)."""
        self._assign[rows] = config
        self.touched[rows] += 1

    def set_in_use(self, r: int, in_use: bool) -> None:
        """Whether a request holds row ``r`` now (it may not move while it does)."""
        if self._in_use[r] != in_use:
            self._in_use[r] = in_use
            self.touched[r] += 1

    def set_stored_tokens(self, key: object, stored: int) -> None:
        """The context now holds KV for only ``stored`` of its tokens (token dropping):
        sizes follow what is stored, re-prefill still costs every token."""
        r = self.row_of[key]
        self._set_tokens(r, int(self._tokens[r]), stored)

    def _set_tokens(self, r: int, tokens: int, stored: int | None = None) -> None:
        self._tokens[r] = tokens
        self.version[r] += 1
        self.touched[r] += 1
        subset = stored is not None and stored < tokens
        shape = self.layout.with_tokens(stored if subset else tokens)
        for j, cfg in enumerate(self.configs):
            if cfg.tier == Tier.DROP:
                self._sizes[r, j] = 0.0
            elif cfg.tier == Tier.GPU:
                self._sizes[r, j] = shape.raw_nbytes
            else:  # a token subset is not dropped again, only quantized
                self._sizes[r, j] = self.cost.stored_nbytes(subset_codec(cfg.codec) if subset else cfg.codec, shape)

    def split(self, child: object, prefix: object, prefix_tokens: int) -> None:
        """``child`` is cut in two: its first ``prefix_tokens`` become context ``prefix``,
        the new parent of ``child``, with the same history, quality and placement."""
        c = self.row_of[child]
        parent = self.keys[self.parent[c]] if self.parent[c] >= 0 else None
        r = self.insert(prefix, prefix_tokens, float(self.last_time[c]), parent)
        for col in (self.freq, self.last_time, self._assign, self._present_quality, self.profiled, self._in_use,
                    self._quality):
            col[r] = col[c]
        self.version[r] += 1
        self.touched[r] += 1
        self._reparent(c, r)
        self._set_tokens(c, int(self._tokens[c]) - prefix_tokens)

    def __contains__(self, key: object) -> bool:
        return key in self.row_of

    def __len__(self) -> int:
        return len(self.row_of)

    def remove(self, key: object) -> None:
        """O(children): the rows below it become roots (the tree removes leaves, so usually none)."""
        r = self.row_of.pop(key)
        self.alive[r] = False
        self.touched[r] += 1
        self.keys[r] = None
        for c in self._children.pop(r, ()):
            self.parent[c] = -1
            self.touched[c] += 1
        self._reparent(r, -1)
        self._free.append(r)

    def children(self, r: int) -> set[int]:
        """Rows whose parent is ``r``."""
        return self._children.get(r, set())

    def _reparent(self, r: int, parent: int) -> None:
        old = int(self.parent[r])
        if old >= 0:
            self._children[old].discard(r)
        if parent >= 0:
            self._children.setdefault(parent, set()).add(r)
        self.parent[r] = parent
        self.touched[r] += 1

    def snapshot(self, into: "ContextTable | None" = None) -> "ContextTable":
        """A copy of every column for a reader in another thread (the background planner),
        refreshed in place when ``into`` is an earlier snapshot of this table at its size:
        only the rows whose ``touched`` count moved are copied, so the owner's lock is held
        for one comparison of a counter column plus the changed rows (a full copy of a
        table of 100k+ contexts held the scheduler ~1 ms). Rows only: no keys."""
        if into is None or getattr(into, "_source", None) is not self or into.alive.size != self.alive.size:
            into = copy.copy(self)
            into._source = self
            into.keys, into.row_of, into._children, into._free = [], {}, {}, []
            for name in _COLUMNS:
                setattr(into, name, getattr(self, name).copy(order="K"))
        else:
            moved = np.flatnonzero(into.touched != self.touched)
            for name in _COLUMNS:
                getattr(into, name)[moved] = getattr(self, name)[moved]
        into.cost = copy.copy(self.cost)  # the scheduler re-learns its prefill rate meanwhile
        return into

    def hit(self, key: object, now: float) -> None:
        """A request used this context: decay its counter to now and add one."""
        r = self.row_of[key]
        self.freq[r] = self.freq[r] * self._decay(now - self.last_time[r]) + 1.0
        self.last_time[r] = now
        self.touched[r] += 1

    def set_quality(self, key: object, codec: str, quality: float) -> None:
        """A measured quality for one codec (its device stage, e.g. ``int4`` for ``int4+zstd``)
        of one context, from the profiler; it also moves the prior of unprofiled contexts."""
        self.set_qualities(np.array([self.row_of[key]]), codec, np.array([quality], dtype=np.float64))

    def set_qualities(self, rows: np.ndarray, codec: str, quality: np.ndarray) -> None:
        """:meth:`set_quality` for many contexts (``rows``) at once."""
        cols = [j for j, c in enumerate(self.quality_codec) if c == codec]
        self._quality[np.ix_(rows, cols)] = quality[:, None]
        self.version[rows] += 1
        self.touched[rows] += 1
        self.profiled[rows] = True
        total, n = self._learnt.get(codec, (0.0, 0))
        self._learnt[codec] = (total + float(quality.sum()), n + len(rows))
        self._prior_row[cols] = self.prior(codec)
        unprofiled = np.flatnonzero(self.alive & ~self.profiled)
        self._quality[np.ix_(unprofiled, cols)] = self._prior_row[cols]
        self.version[unprofiled] += 1
        self.touched[unprofiled] += 1

    def prior(self, codec: str) -> float:
        """Quality assumed for ``codec`` on a context not yet profiled."""
        total, n = self._learnt.get(codec, (0.0, 0))
        return (total + PRIOR_WEIGHT * prior_quality(codec)) / (n + PRIOR_WEIGHT)

    def _decay(self, dt):
        return np.exp(-math.log(2) / self.half_life_s * np.maximum(dt, 0.0))

    # -- views ------------------------------------------------------------------

    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.alive)

    def frequency(self, rows: np.ndarray, now: float) -> np.ndarray:
        return self.freq[rows] * self._decay(now - self.last_time[rows])

    def config_quality(self, rows: np.ndarray) -> np.ndarray:
        """[rows, C]: quality a context would have in each configuration.

        Re-encoding KV that is already lossy cannot make it better, so lossy options are
        capped by the present quality; the GPU option *is* the present KV; dropping and
        recomputing restores exact KV. A token-dropping codec keeps every token of a context
        shorter than ``TokenSelector.MIN_TOKENS``: there it has its quantizer's quality.
        """
        q = _columns(self._quality, rows)
        short = np.flatnonzero(self._tokens[rows] < TokenSelector.MIN_TOKENS) if self._dropping.any() else ()
        if len(short):  # stored whole under a dropping codec: no token is dropped
            for j in np.flatnonzero(self._dropping):
                k = self._inner_col[j]
                q[j, short] = self._quality[rows[short], k] if k >= 0 else self._inner_prior[j]
        np.minimum(q, self._present_quality[rows], out=q)
        q[self.tier_of == Tier.DROP] = 1.0
        return q.T

    def config_sizes(self, rows: np.ndarray) -> np.ndarray:
        """[rows, C]: bytes a context takes in each configuration (in that configuration's tier)."""
        return _columns(self._sizes, rows).T

    def load_seconds(self, rows: np.ndarray) -> np.ndarray:
        """[rows, C]: seconds to make each context usable on the GPU from each configuration."""
        seconds, per_byte, per_token = np.array([self.cost.load_terms(c, self.layout) for c in self.configs]).T
        load = self.config_sizes(rows).T * per_byte[:, None]  # fresh [C, rows]
        load += seconds[:, None]
        tokens = self._tokens[rows].astype(np.float64)
        for j in np.flatnonzero(per_token):  # per configuration: no [C, rows] temporary
            load[j] += per_token[j] * tokens
        return load.T


def _columns(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows].T`` of a configuration-major matrix as a contiguous [C, rows] array.

    Views over rows are computed on these and returned transposed: still [rows, C] to
    the caller, and contiguous per configuration for the solver, with no copy."""
    return np.take(matrix.T, rows, axis=1)
