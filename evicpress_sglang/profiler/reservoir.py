"""Held-out queries per cached context: what the profiler replays against compressed KV.

EVICPRESS estimates how much a codec hurts a context by re-asking questions that were
really asked of it. Every request that reuses a cached prefix offers the rest of its
prompt (the query after the shared prefix) to that prefix's reservoir; each reservoir
keeps a uniform sample of at most ``k`` of them (Vitter's algorithm R), so a popular
context does not keep only its first or its latest questions.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Hashable, Sequence


class HeldOutQueries:
    def __init__(self, k: int, max_tokens: int = 512, seed: int = 0) -> None:
        if k < 0 or max_tokens <= 0:
            raise ValueError(f"held-out queries: need k >= 0 and max_tokens > 0, got {k}, {max_tokens}")
        self.k = k
        self.max_tokens = max_tokens  # a query longer than this is cut: its head is what follows the prefix
        self._rng = random.Random(seed)
        self._kept: dict[Hashable, list[array]] = {}
        self._seen: dict[Hashable, int] = {}

    def offer(self, context: Hashable, query: Sequence[int]) -> None:
        """One request asked ``query`` after ``context``'s tokens."""
        if self.k == 0 or len(query) == 0:
            return
        seen = self._seen.get(context, 0) + 1
        self._seen[context] = seen
        kept = self._kept.setdefault(context, [])
        tokens = array("q", query[: self.max_tokens])
        if len(kept) < self.k:
            kept.append(tokens)
        else:
            slot = self._rng.randrange(seen)
            if slot < self.k:
                kept[slot] = tokens

    def queries(self, context: Hashable) -> list[array]:
        return list(self._kept.get(context, ()))

    def contexts(self) -> list[Hashable]:
        """The contexts that have held-out queries."""
        return list(self._kept)

    def seen(self, context: Hashable) -> int:
        """Queries ever offered for ``context`` (kept or not)."""
        return self._seen.get(context, 0)

    def forget(self, context: Hashable) -> tuple[list[array], int]:
        """Drop ``context``; returns what was kept of it (queries, how many were offered)."""
        return self._kept.pop(context, []), self._seen.pop(context, 0)

    def restore(self, context: Hashable, kept: list[array], seen: int) -> None:
        """Give ``context`` back what :meth:`forget` returned (its node came back)."""
        if kept:
            self._kept[context] = kept[: self.k]
            self._seen[context] = seen

    def merge(self, context: Hashable, kept: Sequence[Sequence[int]], seen: int) -> None:
        """Add to ``context`` a uniform sample ``kept`` of ``seen`` queries asked elsewhere (a
        context below it): what is kept stays a uniform sample of all ``seen`` + its own. Each
        slot is drawn from one side with the odds of the queries that side has not yet given."""
        if self.k == 0 or not kept:
            return
        mine, mine_seen = self._kept.get(context, []), self._seen.get(context, 0)
        sides = [[*mine], [array("q", q[: self.max_tokens]) for q in kept]]
        left = [mine_seen, max(seen, len(kept))]
        for side in sides:
            self._rng.shuffle(side)
        merged = []
        while len(merged) < self.k and (sides[0] or sides[1]):
            pick = 0 if not sides[1] else 1 if not sides[0] else int(self._rng.random() * (left[0] + left[1]) >= left[0])
            merged.append(sides[pick].pop())
            left[pick] -= 1
        self._kept[context] = merged
        self._seen[context] = mine_seen + max(seen, len(kept))

    def __len__(self) -> int:
        return len(self._kept)
