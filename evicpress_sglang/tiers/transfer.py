"""Host <-> GPU copies that never make the scheduler thread wait for queued forward passes.

SGLang's scheduler queues forward passes on the current CUDA stream and carries on
(the overlap scheduler). Anything that synchronises that stream - ``tensor.cpu()``, a
copy from pageable memory, ``stream.synchronize()`` - first waits for every queued
forward: storing a 1.2 GB context took 374 ms instead of 25 ms on the reference H100
(bench/store_path_speed.py). So:

* :func:`copy_out` (GPU -> pinned host) runs on a side stream that waits, on the GPU,
  for what the current stream had queued when it was asked (the encode that produced
  the bytes); the CPU returns at once with an event that fires when the bytes are home.
  Forward passes queued later overlap with the copy.
* :func:`copy_in` (pinned host -> GPU) is queued on the current stream after the bytes'
  event: the forward pass that reads the loaded KV is queued behind it anyway.
* :func:`upload` (pageable host -> GPU, e.g. a file just read) goes through a small ring
  of pinned staging buffers on an upload stream that never waits for compute, so the CPU
  waits only for its own chunks.

Without CUDA these are plain synchronous copies.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Sequence

import torch

STAGING_CHUNK = 16 << 20  # bytes per pinned staging buffer: large enough for full PCIe speed
STAGING_SLOTS = 4
#: GPU bytes that may wait for their copy out at once. Each waits behind the forward pass
#: queued before it and holds GPU memory outside SGLang's pool meanwhile; past this, a new
#: copy waits (on the CPU) for the oldest ones, as every copy did before this module.
MAX_INFLIGHT_BYTES = 2 << 30


class _Streams:
    """The side streams and staging ring of one GPU."""

    def __init__(self, device: torch.device) -> None:
        self.copy_out = torch.cuda.Stream(device)
        self.upload = torch.cuda.Stream(device)
        self.staging = [torch.empty(STAGING_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_SLOTS)]
        self.staged: list[torch.cuda.Event | None] = [None] * STAGING_SLOTS
        self.lock = threading.Lock()  # the staging ring is shared by every thread that uploads
        self.inflight: deque[tuple[torch.cuda.Event, int]] = deque()  # copies out not known done
        self.inflight_bytes = 0

    def make_room(self, nbytes: int) -> None:
        """Forget finished copies out; wait for the oldest while ``nbytes`` more would exceed the budget."""
        while self.inflight and (self.inflight[0][0].query()
                                 or self.inflight_bytes + nbytes > MAX_INFLIGHT_BYTES):
            event, n = self.inflight.popleft()
            event.synchronize()
            self.inflight_bytes -= n


_streams: dict[torch.device, _Streams] = {}
_streams_lock = threading.Lock()


def _for(device: torch.device) -> _Streams:
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    with _streams_lock:
        if device not in _streams:
            _streams[device] = _Streams(device)
        return _streams[device]


def copy_out(src: torch.Tensor, dsts: Sequence[torch.Tensor]) -> torch.cuda.Event | None:
    """Copy 1-D ``src`` into the host tensors ``dsts`` (pinned; their sizes add up to its size,
    in order) once the work queued so far on the current stream is done, without waiting here.

    Returns the event after which ``dsts`` hold the bytes, or None when the copy is already
    complete (``src`` on the CPU). ``src`` stays valid for the copy however the caller drops it.
    """
    parts = src.split([d.numel() for d in dsts])
    if not src.is_cuda:
        for d, part in zip(dsts, parts):
            d.copy_(part)
        return None
    s = _for(src.device)
    nbytes = src.numel() * src.element_size()
    s.make_room(nbytes)
    s.copy_out.wait_stream(torch.cuda.current_stream(src.device))
    with torch.cuda.stream(s.copy_out):
        for d, part in zip(dsts, parts):
            d.copy_(part, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    src.record_stream(s.copy_out)  # the caching allocator must not reuse src before the copy ran
    s.inflight.append((done, nbytes))
    s.inflight_bytes += nbytes
    return done


def copy_in(srcs: Sequence[torch.Tensor], device: torch.device | str,
            after: torch.cuda.Event | None = None) -> torch.Tensor:
    """The host tensors ``srcs`` (1-D uint8) joined into one tensor on ``device``. ``after``
    is the event that makes them valid (from :func:`copy_out`); on a GPU the copies are queued
    on the current stream behind it and this returns at once, so ``srcs`` must be pinned and
    must not change until the current stream has passed the copies."""
    device = torch.device(device)
    if device.type != "cuda":
        if after is not None:
            after.synchronize()
        return torch.cat(list(srcs)).to(device)
    if after is not None:
        torch.cuda.current_stream(device).wait_event(after)
    out = torch.empty(sum(t.numel() for t in srcs), dtype=torch.uint8, device=device)
    for part, src in zip(out.split([t.numel() for t in srcs]), srcs):
        part.copy_(src, non_blocking=True)
    return out


def upload(src: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A copy of host tensor ``src`` (pageable is fine; 1-D uint8) on ``device``. On a GPU the
    bytes go through the pinned staging ring on the upload stream; the current stream waits
    for them, the CPU only for the staging buffers it reuses."""
    device = torch.device(device)
    if device.type != "cuda":
        return src.to(device, copy=True)
    s = _for(device)
    current = torch.cuda.current_stream(device)
    with s.lock, torch.cuda.stream(s.upload):
        out = torch.empty(src.numel(), dtype=torch.uint8, device=device)
        flat = src.reshape(-1)
        for i, start in enumerate(range(0, flat.numel(), STAGING_CHUNK)):
            slot = i % STAGING_SLOTS
            if s.staged[slot] is not None:
                s.staged[slot].synchronize()  # the previous copy out of this buffer
            n = min(STAGING_CHUNK, flat.numel() - start)
            buf = s.staging[slot][:n]
            buf.copy_(flat[start : start + n])
            out[start : start + n].copy_(buf, non_blocking=True)
            s.staged[slot] = torch.cuda.Event()
            s.staged[slot].record()
        done = torch.cuda.Event()
        done.record()
    current.wait_event(done)
    out.record_stream(current)  # allocated on the upload stream, used on the current one
    return out


def ready_event(src: torch.Tensor) -> torch.cuda.Event | None:
    """For a writer thread that copies ``src`` off the GPU later: an event after which its
    bytes are final (the work queued so far on the current stream); None on the CPU."""
    if not src.is_cuda:
        return None
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(src.device))
    return ready


def to_host_after(src: torch.Tensor, ready: torch.cuda.Event | None, stream: torch.cuda.Stream | None) -> torch.Tensor:
    """``src`` on the CPU, copied once ``ready`` (from :func:`ready_event`) has fired, on the
    writer's own ``stream``: the writer waits for the bytes, never for later compute."""
    if not src.is_cuda:
        return src
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        return src.to("cpu")  # waits for this stream only


def to_device(src: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A copy of ``src`` on ``device`` by the cheapest of the paths above."""
    device = torch.device(device)
    if src.device.type == "cpu" and device.type == "cuda":
        return copy_in([src], device) if src.is_pinned() else upload(src, device)
    return src.to(device, copy=True)
