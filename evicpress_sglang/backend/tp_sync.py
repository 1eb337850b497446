"""Keeping tensor-parallel ranks' caches in step.

With ``--tp N`` every rank runs its own scheduler and its own cache over its shard of the
KV heads, and SGLang needs their trees to agree step by step (the ranks batch the same
requests with the same prefix lengths). Our decisions read inputs that differ per rank:
the clock, the learnt prefill rate, start-up calibration, and the outcome of each tier
operation (one rank's disk may fail). Those inputs are agreed here, as HiCache does, with
collectives over the CPU (gloo) group SGLang passes as ``params.tp_cache_group``.

Every collective is one all-reduce MAX of a fixed-width float64 vector: "a rank failed",
the collective's kind as +kind and -kind (so ranks in different collectives notice), then
rank 0's broadcast values, then MIN values (negated). One shape for every collective means
a rank whose code raised, or took another path, still pairs with whatever collective the
others are in instead of hanging: its guard sends the failure flag, the others see it (or
the kinds differ) in the collective they wait in, raise :class:`RankAbort` and leave by
their own guard, so every rank has taken part in the same number of collectives (see
:meth:`RankSync.close`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Slots per collective: failure flag, +kind, -kind, then values (broadcast + MIN).
WIDTH = 10
_HEAD = 3
_AGREE, _CLOSE = 2.0, 1.0


class RankAbort(Exception):
    """Another rank failed inside the entry point all ranks are in: leave it the safe way."""


class RankSync:
    """Collectives of one cache's TP group; every method is a local no-op without a group
    (or with one rank), so single-GPU serving pays nothing."""

    def __init__(self, group: torch.distributed.ProcessGroup | None) -> None:
        self.group = group
        active = group is not None and torch.distributed.is_initialized()
        self.size = torch.distributed.get_world_size(group) if active else 1
        self.rank = torch.distributed.get_rank(group) if active else 0
        self.active = self.size > 1
        self.enabled = True  # tests switch agreement off to show what diverges without it

    @property
    def on(self) -> bool:
        return self.active and self.enabled

    def _all_reduce(self, kind: float, failed: bool, bcast: Sequence[float] = (),
                    mins: Sequence[float] = ()) -> tuple[bool, list[float]]:
        """One collective; returns (someone failed or was in another collective, values)."""
        if len(bcast) + len(mins) > WIDTH - _HEAD:
            raise ValueError(f"at most {WIDTH - _HEAD} values per collective")
        vec = torch.full((WIDTH,), -math.inf, dtype=torch.float64)
        vec[:_HEAD] = torch.tensor([1.0 if failed else 0.0, kind, -kind], dtype=torch.float64)
        if self.rank == 0 and bcast:
            vec[_HEAD : _HEAD + len(bcast)] = torch.tensor(list(bcast), dtype=torch.float64)
        if mins:
            vec[_HEAD + len(bcast) : _HEAD + len(bcast) + len(mins)] = -torch.tensor(list(mins), dtype=torch.float64)
        torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX, group=self.group)
        out = vec.tolist()
        return out[0] > 0 or out[1] != -out[2], out[_HEAD:]

    def agree(self, bcast: Sequence[float] = (), mins: Sequence[float] = ()) -> tuple[list[float], list[float]]:
        """Rank 0's ``bcast`` values and the MIN of ``mins`` over ranks, in one collective.
        Raises :class:`RankAbort` when another rank failed or took another path meanwhile."""
        if not self.on:
            return list(bcast), list(mins)
        broken, out = self._all_reduce(_AGREE, False, bcast, mins)
        if broken:
            raise RankAbort("another tensor-parallel rank failed in this step")
        return out[: len(bcast)], [-x for x in out[len(bcast) : len(bcast) + len(mins)]]

    def same(self, values: Sequence[float]) -> list[bool]:
        """Per value, whether every rank holds exactly it (MIN of v and of -v, one collective)."""
        lo = self.agree(mins=[*values, *(-v for v in values)])[1]
        return [a == -b for a, b in zip(lo[: len(values)], lo[len(values) :])]

    def all_ok(self, ok: bool) -> bool:
        """True only if ``ok`` on every rank (a tier outcome counts only if it held everywhere)."""
        return self.agree(mins=[1.0 if ok else 0.0])[1][0] > 0

    def from_rank0(self, *values: float) -> list[float]:
        return self.agree(bcast=values)[0]

    def close(self, failed: bool) -> bool:
        """End an entry point in which ranks may agree on something (every rank decides
        alike whether to close one, from agreed state): each says whether it failed; True
        if any did. A rank that already saw another's failure (:class:`RankAbort`) must not
        call this: that collective was its close."""
        if not self.on:
            return False
        return self._all_reduce(_CLOSE, failed)[0]

    def gather(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (rare, variable-size agreements: lost blobs)."""
        if not self.on:
            return [obj]
        out: list[object] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def object_from_rank0(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (start-up: the calibrated cost model)."""
        if not self.on:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(self.group, 0),
                                                group=self.group)
        return box[0]
