"""Reads from the remote store, off the scheduler's thread.

A network round trip on the scheduler's thread stalls every running request's next
token, so nothing the scheduler does waits for the store. When a request arrives
(``EvicPressRadixCache.prefetch_for``), the cache starts, on worker threads, the
reads its match will want: the shared context that may continue where its match ends,
and the blobs of remote-tier placeholders on its path. While one of those is in flight
the request is held back from prefill (``EvicPressRadixCache.held_for_prefetch``,
as SGLang's HiCache holds requests whose storage prefetch is running), but never longer
than its deadline: about as long as recomputing the tokens would take, since waiting
longer than that cannot win. The scheduler keeps decoding meanwhile. The next match then
finds the finished read here and attaches or loads it; a read not finished by then is a
miss for that match.

Finished reads are kept for a short while (a finished "absent" is the negative cache),
within a byte budget; the oldest go first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

#: How long a finished read waits to be used (a found blob) or is remembered (an absent one).
KEEP_S = 5.0


class Prefetcher:
    """Named reads on worker threads: start once, poll from the scheduler, never wait."""

    def __init__(self, max_bytes: int, workers: int = 2, keep_s: float = KEEP_S) -> None:
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="evicpress-prefetch")
        self._lock = threading.Lock()
        self._running: dict[str, Future] = {}
        self._done: OrderedDict[str, tuple[float, Any, int]] = OrderedDict()  # name -> (finished, value, bytes)
        self._bytes = 0
        self._held: dict[str, tuple[float, set[str]]] = {}  # rid -> (deadline, names it waits for)
        self.counters = {"started": 0, "found": 0, "absent": 0, "failed": 0, "late": 0, "evicted": 0}

    def start(self, name: str, read: Callable[[], tuple[Any, int]], rid: str | None = None,
              deadline: float = 0.0) -> None:
        """Run ``read`` (returning ``(value or None, bytes it holds)``) unless ``name`` is
        already running or finished; a request ``rid`` is held for it until ``deadline``
        (monotonic seconds)."""
        with self._lock:
            self._expire(time.monotonic())
            if rid is not None and deadline > time.monotonic():
                held = self._held.setdefault(rid, (deadline, set()))
                held[1].add(name)
            if name in self._running or name in self._done:
                return
            self.counters["started"] += 1
            self._running[name] = self._pool.submit(self._run, name, read)

    def _run(self, name: str, read: Callable[[], tuple[Any, int]]) -> None:
        try:
            value, nbytes = read()
        except Exception as e:  # noqa: BLE001 - a worker must survive anything a read does: a miss
            log.debug("evicpress: prefetch of %r failed (%s); a miss", name, e)
            value, nbytes = None, 0
            with self._lock:
                self.counters["failed"] += 1
        with self._lock:
            self._running.pop(name, None)
            self.counters["found" if value is not None else "absent"] += 1
            self._done[name] = (time.monotonic(), value, nbytes)
            self._bytes += nbytes
            self._shrink()

    def result(self, name: str) -> tuple[bool, Any]:
        """(whether the read of ``name`` finished, its value: None for absent or failed).
        (False, None) for a read running or never started."""
        with self._lock:
            self._expire(time.monotonic())
            done = self._done.get(name)
        return (False, None) if done is None else (True, done[1])

    def known(self, name: str) -> bool:
        """Whether ``name`` is being read or was read recently (so starting it again is a no-op)."""
        with self._lock:
            self._expire(time.monotonic())
            return name in self._running or name in self._done

    def take(self, name: str) -> Any:
        """The value of a finished read, handed over once (its bytes leave the budget)."""
        with self._lock:
            done = self._done.pop(name, None)
            if done is None:
                return None
            self._bytes -= done[2]
            if done[1] is None:  # an absent name stays remembered
                self._done[name] = done
            return done[1]

    def held(self, rids: Iterable[str]) -> set[str]:
        """The requests among ``rids`` still waiting for a read of theirs that runs."""
        now = time.monotonic()
        out = set()
        with self._lock:
            for rid in rids:
                entry = self._held.get(rid)
                if entry is None:
                    continue
                deadline, names = entry
                if now < deadline and any(n in self._running for n in names):
                    out.add(rid)
                else:
                    if any(n in self._running for n in names):
                        self.counters["late"] += 1
                    del self._held[rid]
        return out

    def clear(self) -> None:
        """Forget every finished read (a flush: nothing read before it may be used after)."""
        with self._lock:
            self._done.clear()
            self._bytes = 0
            self._held.clear()

    def status(self) -> dict:
        with self._lock:
            return {**self.counters, "running": len(self._running), "ready_bytes": self._bytes}

    def _expire(self, now: float) -> None:
        while self._done:
            finished = next(iter(self._done.values()))[0]
            if now - finished < self.keep_s:
                break
            self._drop_oldest()
        # requests that left the queue without being asked about again (aborted, finished)
        for rid in [r for r, (deadline, _) in self._held.items() if deadline + self.keep_s <= now]:
            del self._held[rid]

    def _shrink(self) -> None:
        while self._bytes > self.max_bytes and self._done:
            self._drop_oldest()
            self.counters["evicted"] += 1

    def _drop_oldest(self) -> None:
        _, (_, _, nbytes) = self._done.popitem(last=False)
        self._bytes -= nbytes
