"""Timing forward batches: prefills teach the cost model, the profiler's batches are charged to it.

A hook around SGLang's ``TpModelWorker.forward_batch_generation`` brackets a batch with
CUDA events on the current stream when someone needs its time; events are read only once
the GPU has passed them (``query()``), so timing never stalls the scheduler. Two users:

* learning the prefill cost per token: plain prefill (extend) batches feed a
  :class:`PrefillFit` whose slope (seconds per token beyond the per-batch overhead) becomes
  ``CostModel.prefill_s_per_token``; until it has one, its upper bound can only lower the
  prior. Batches that return prompt logprobs (the profiler's teacher-forced scoring) are
  not learnt from: they do work a re-prefill does not;
* the profiler's GPU budget (:mod:`.profile_budget`): while a profile job runs, a batch
  carrying its requests (prefill or decode) is charged to it in proportion to their part.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from ..policy import CostModel
from ..policy.cost import PrefillFit
from .guard import hook
from .profile_budget import ProfileBudget

_active: "PrefillTimer | None" = None
_budget: ProfileBudget | None = None
MAX_PENDING = 64  # batches whose events the GPU has not passed yet; older ones are let go


class PrefillTimer:
    """What the prefill batches taught: the fit, and the cost model it updates."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.fit = PrefillFit()
        self.observed = 0

    def observe(self, tokens: int, requests: int, seconds: float) -> None:
        self.fit.add(tokens, seconds, requests)
        self.observed += 1
        slope = self.fit.per_token()
        if slope is not None:
            self.cost.prefill_s_per_token = slope
            return
        bound = self.fit.bound()
        if bound is not None and bound < self.cost.prefill_s_per_token:
            self.cost.prefill_s_per_token = bound


@dataclass
class _Timing:
    begin: object  # a CUDA event, or perf_counter() without CUDA
    tokens: int
    requests: int
    learn: PrefillTimer | None  # a plain prefill: teaches this timer
    budget: ProfileBudget | None  # the profiler's part of the batch is charged here
    part: float
    end: object = None


_pending: deque[_Timing] = deque(maxlen=MAX_PENDING)


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


def charge_profiler(budget: ProfileBudget | None) -> None:
    """Charge the profiler's batches to ``budget`` from now on (None: stop)."""
    global _budget
    _budget = budget


def around_forward(original, worker, batch=None, *args, **kwargs):
    """AROUND hook for ``TpModelWorker.forward_batch_generation``. The forward pass runs
    exactly once whatever the timing does; a timing failure only costs the measurement
    (counted in the hooks' internal errors)."""
    started = _start(batch)
    result = original(worker, batch, *args, **kwargs)
    if started is not None:
        _finish(started)
    return result


def poll() -> None:
    """Fold in every timing the GPU has finished."""
    while _pending and _pending[0].end.query():
        t = _pending.popleft()
        _fold(t, t.begin.elapsed_time(t.end) / 1000.0)


def _fold(t: _Timing, seconds: float) -> None:
    if t.learn is not None:
        t.learn.observe(t.tokens, t.requests, seconds)
    if t.budget is not None:
        t.budget.charge(seconds * t.part)


def _plain_prefill(batch) -> bool:
    """A prefill and nothing else: not mixed with decode rows, not a speculative verify step
    (``is_extend()`` holds for those too, and their ``extend_num_tokens`` is the batch's
    last prefill's), not returning prompt logprobs."""
    return (getattr(batch, "forward_mode", None) == ForwardMode.EXTEND
            and bool(getattr(batch, "extend_num_tokens", None)) and not getattr(batch, "return_logprob", False))


@hook(lambda batch: None)
def _start(batch) -> _Timing | None:
    poll()
    learn = _active if _active is not None and _plain_prefill(batch) else None
    part = _budget.part_of(batch) if _budget is not None and batch is not None else 0.0
    if learn is None and part <= 0:
        return None
    begin: object = time.perf_counter()
    if torch.cuda.is_available():
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
    return _Timing(begin, int(getattr(batch, "extend_num_tokens", None) or 0),
                   len(getattr(batch, "reqs", None) or ()) or 1, learn, _budget if part > 0 else None, part)


@hook(lambda started: None)
def _finish(started: _Timing) -> None:
    if isinstance(started.begin, float):
        _fold(started, time.perf_counter() - started.begin)
        return
    started.end = torch.cuda.Event(enable_timing=True)
    started.end.record()
    _pending.append(started)
