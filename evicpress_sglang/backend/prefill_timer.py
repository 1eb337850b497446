"""Learning the prefill cost per token from the server's own prefills.

The cost of dropping a context is re-prefilling it, so the policy needs seconds per
token on *this* model and GPU. A hook around SGLang's ``TpModelWorker.forward_batch_generation``
brackets every prefill (extend) batch with CUDA events on the current stream; events
are read only once the GPU has passed them (``query()``), so timing never stalls the
scheduler. Finished measurements feed a :class:`PrefillFit` whose slope (seconds per
token beyond the per-batch overhead) becomes ``CostModel.prefill_s_per_token``; until it
has one, its upper bound can only lower the prior. Batches that return prompt logprobs
(the profiler's teacher-forced scoring) are not timed: they do work a re-prefill does not.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from ..policy import CostModel
from ..policy.cost import PrefillFit
from .guard import hook

_active: "PrefillTimer | None" = None


class PrefillTimer:
    def __init__(self, cost: CostModel, max_pending: int = 64) -> None:
        self.cost = cost
        self.fit = PrefillFit()
        self.pending: deque = deque(maxlen=max_pending)
        self.observed = 0

    def start(self, tokens: int, requests: int = 1) -> tuple:
        """Mark the start of a prefill of ``tokens`` tokens of ``requests`` requests; hand
        the result to :meth:`finish`."""
        self.poll()
        if torch.cuda.is_available():
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin, tokens, requests
        return time.perf_counter(), tokens, requests

    def finish(self, started: tuple) -> None:
        begin, tokens, requests = started
        if isinstance(begin, float):
            self._observe(tokens, requests, time.perf_counter() - begin)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((begin, end, tokens, requests))

    def poll(self) -> None:
        """Fold in every measurement the GPU has finished."""
        while self.pending and self.pending[0][1].query():
            start, end, tokens, requests = self.pending.popleft()
            self._observe(tokens, requests, start.elapsed_time(end) / 1000.0)

    def _observe(self, tokens: int, requests: int, seconds: float) -> None:
        self.fit.add(tokens, seconds, requests)
        self.observed += 1
        slope = self.fit.per_token()
        if slope is not None:
            self.cost.prefill_s_per_token = slope
            return
        bound = self.fit.bound()
        if bound is not None and bound < self.cost.prefill_s_per_token:
            self.cost.prefill_s_per_token = bound


def describe() -> dict | None:
    """What the prefill cost is learnt from, for the status route (None: pinned, not learnt)."""
    if _active is None:
        return None
    return {"batches": _active.observed, "fitted_s_per_token": _active.fit.per_token(),
            "bound_s_per_token": _active.fit.bound()}


def activate(cost: CostModel | None) -> PrefillTimer | None:
    """Time prefills into ``cost`` from now on (None: stop timing)."""
    global _active
    _active = PrefillTimer(cost) if cost is not None else None
    return _active


def around_forward(original, worker, batch=None, *args, **kwargs):
    """AROUND hook for ``TpModelWorker.forward_batch_generation``: time pure prefill batches.
    The forward pass runs exactly once whatever the timing does; a timing failure only
    costs the measurement (counted in the hooks' internal errors)."""
    started = _start(_active, batch)
    result = original(worker, batch, *args, **kwargs)
    if started is not None:
        _finish(_active, started)
    return result


@hook(lambda timer, batch: None)
def _start(timer: PrefillTimer | None, batch) -> tuple | None:
    mode = getattr(batch, "forward_mode", None)
    tokens = getattr(batch, "extend_num_tokens", None)
    if (timer is None or mode is None or not tokens or not mode.is_extend() or getattr(mode, "is_mixed", bool)()
            or getattr(batch, "return_logprob", False)):
        return None
    return timer.start(int(tokens), len(getattr(batch, "reqs", None) or ()) or 1)


@hook(lambda timer, started: None)
def _finish(timer: PrefillTimer | None, started: tuple) -> None:
    if timer is not None:
        timer.finish(started)
