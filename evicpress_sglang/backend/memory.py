"""What the profiler learnt about a context outlives its node.

A context's held-out queries and measured qualities are kept per radix node, and a node
leaves the tree when its context is dropped (the policy chose recomputing over storing
it). Under memory pressure that is most contexts, most of the time: a pressured run on an
H200 measured 4 contexts and kept the profile of 1. So what was learnt is remembered by the
context's content (the hash of its path's tokens) when the node goes, and handed back
when a request recomputes exactly that context and its node returns.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: Contexts remembered (the least recently dropped go first).
CAPACITY = 10_000


@dataclass
class Learnt:
    queries: list[array]  # held-out queries kept for the context
    seen: int  # queries ever offered for it
    record: Any  # its last profile (a profiling.Record), or None


class ContextMemory:
    """Learnt facts of dropped contexts, by content key, bounded."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, Learnt] = OrderedDict()
        self.recalled = 0

    def keep(self, key: str, learnt: Learnt) -> None:
        self._kept[key] = learnt
        self._kept.move_to_end(key)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def profiled(self, key: str, record: Any) -> None:
        """A profile measured for the context of content ``key`` after its node was dropped."""
        learnt = self._kept.get(key)
        self.keep(key, Learnt([], 0, record) if learnt is None else Learnt(learnt.queries, learnt.seen, record))

    def recall(self, key: str) -> Learnt | None:
        """What was learnt about the context of content ``key`` (handed over once)."""
        learnt = self._kept.pop(key, None)
        self.recalled += learnt is not None
        return learnt

    def __len__(self) -> int:
        return len(self._kept)
