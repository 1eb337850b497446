"""The writer thread of a tier whose ``put`` returns before the bytes are stored.

The disk and remote tiers both queue a put for one thread that copies the blob off the
GPU, entropy-codes it and writes it (file or network), so the scheduler never waits for
any of that. This is that thread and the byte budget of what waits for it; each tier
keeps its own index and says what one write does.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

from ..codecs import EncodedKV
from .base import Pack

Job = TypeVar("Job")


@dataclass
class Write:
    """A put waiting for the writer thread."""

    key: str
    enc: EncodedKV  # as handed to put; its payload may still be on the GPU
    meta: dict | None
    pack: Pack | None
    ready: torch.cuda.Event | None  # recorded on the producer's stream: the payload is final after it
    reserved: int = 0  # bytes of the tier's capacity held for it


class BackgroundWriter(Generic[Job]):
    """Runs ``write(job)`` for every submitted job in order on one daemon thread.

    ``lock`` is the tier's own condition: submitting happens under it (so a tier updates its
    index and queues in one step), and it is notified whenever a write finishes.
    """

    def __init__(self, lock: threading.Condition, write: Callable[[Job], None], max_pending_bytes: int,
                 name: str) -> None:
        self.lock = lock
        self.max_pending_bytes = max_pending_bytes
        self._write = write
        self._queued_bytes = 0
        self._queue: queue.Queue[tuple[Job, int]] = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def wait_for_room(self, nbytes: int) -> None:
        """Block (``lock`` held) while ``nbytes`` more would exceed ``max_pending_bytes``; a
        single job larger than the budget waits only for the queue to drain."""
        while self._queued_bytes and self._queued_bytes + nbytes > self.max_pending_bytes:
            self.lock.wait()

    def submit(self, job: Job, nbytes: int) -> None:
        """Queue ``job`` (``lock`` held, after :meth:`wait_for_room`); ``nbytes`` counts against the budget."""
        self._queued_bytes += nbytes
        self._queue.put((job, nbytes))

    def flush(self) -> None:
        """Wait until every queued write has finished (or failed)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            job, nbytes = self._queue.get()
            try:
                self._write(job)
            finally:
                with self.lock:
                    self._queued_bytes -= nbytes
                    self.lock.notify_all()
                self._queue.task_done()
