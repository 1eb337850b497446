"""Learning the prefill cost per token from the server's own prefills.

The cost of dropping a context is re-prefilling it, so the policy needs seconds per
token on *this* model and GPU. A hook around SGLang's ``TpModelWorker.forward_batch_generation``
brackets every prefill (extend) batch with CUDA events on the current stream; events
are read only once the GPU has passed them (``query()``), so timing never stalls the
scheduler. Finished measurements feed a :class:`PrefillFit` whose slope (seconds per
token beyond the per-batch overhead) becomes ``CostModel.prefill_s_per_token``.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

import torch

from ..policy import CostModel
from ..policy.cost import PrefillFit

_active: "PrefillTimer | None" = None


class PrefillTimer:
    def __init__(self, cost: CostModel, max_pending: int = 64) -> None:
        self.cost = cost
        self.fit = PrefillFit()
        self.pending: deque = deque(maxlen=max_pending)
        self.observed = 0

    @contextmanager
    def measure(self, tokens: int):
        self.poll()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((start, end, tokens))
        else:
            t0 = time.perf_counter()
            yield
            self._observe(tokens, time.perf_counter() - t0)

    def poll(self) -> None:
        """Fold in every measurement the GPU has finished."""
        while self.pending and self.pending[0][1].query():
            start, end, tokens = self.pending.popleft()
            self._observe(tokens, start.elapsed_time(end) / 1000.0)

    def _observe(self, tokens: int, seconds: float) -> None:
        self.fit.add(tokens, seconds)
        self.observed += 1
        slope = self.fit.per_token()
        if slope is not None:
            self.cost.prefill_s_per_token = slope


def activate(cost: CostModel | None) -> PrefillTimer | None:
    """Time prefills into ``cost`` from now on (None: stop timing)."""
    global _active
    _active = PrefillTimer(cost) if cost is not None else None
    return _active


def around_forward(original, worker, batch=None, *args, **kwargs):
    """AROUND hook for ``TpModelWorker.forward_batch_generation``: time pure prefill batches."""
    timer = _active
    mode = getattr(batch, "forward_mode", None)
    tokens = getattr(batch, "extend_num_tokens", None)
    if timer is None or mode is None or not tokens or not mode.is_extend() or getattr(mode, "is_mixed", bool)():
        return original(worker, batch, *args, **kwargs)
    with timer.measure(int(tokens)):
        return original(worker, batch, *args, **kwargs)
