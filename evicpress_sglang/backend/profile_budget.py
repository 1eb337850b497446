"""The quality profiler's GPU budget: what its requests cost the GPU, kept within ``profile_share``.

The profiler used to pace itself by the wall time its requests were in flight (busy ``b``
seconds, then idle ``b * (1 - share) / share``). Under load that overstates its use many
times over: its requests sit prefill rounds out while users wait, and its answers decode
as a few rows of the users' batches. A pressured H200 run (SmolLM2, 3 requests/s) made one
job per ~30 s that way and measured 6 of the 12 reused contexts in 4 minutes.

So the scheduler charges the profiler what it uses: the GPU time of every forward batch
that carries its requests, in proportion to their part of the batch (tokens of a prefill,
rows of a decode; :mod:`.prefill_timer` times them), plus the time staging a copy takes;
and it hands out a new job only while the charge stays within ``profile_share`` of the
time that passed. Unused share is banked up to ``BANK_S`` seconds of it, so a quiet hour
does not buy a burst; a server starts with a full bank, so the first contexts are measured
in its first minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sglang.srt.model_executor.forward_batch_info import ForwardMode

from ..profiler.client import RID_PREFIX

#: the most unused share that is banked: ``BANK_S * profile_share`` seconds of GPU time
BANK_S = 60.0


class ProfileBudget:
    def __init__(self, share: Callable[[], float], running: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``share()``: the current ``profile_share`` (it can change at runtime);
        ``running()``: whether any profile job runs (batches are only inspected then)."""
        self.share = share
        self.running = running
        self.clock = clock
        self.balance_s = share() * BANK_S  # GPU seconds the profiler may still use
        self.charged_s = 0.0
        self.refused = 0  # jobs asked for while the share was spent
        self._last = clock()

    def _accrue(self) -> None:
        now = self.clock()
        share = self.share()
        self.balance_s = min(self.balance_s + share * (now - self._last), max(self.balance_s, share * BANK_S))
        self._last = now

    def charge(self, seconds: float) -> None:
        if seconds > 0:
            self._accrue()
            self.balance_s -= seconds
            self.charged_s += seconds

    def allows_job(self) -> bool:
        """Whether a new job fits the share now (counted as refused if not)."""
        self._accrue()
        if self.balance_s > 0:
            return True
        self.refused += 1
        return False

    def part_of(self, batch) -> float:
        """The profiler's part of a forward batch: its share of the tokens of a prefill, of
        the rows of a decode; 0 while no job runs (the batch is not even looked at). A user
        request whose id starts with the profiler's prefix is taken for the profiler's."""
        if not self.running():
            return 0.0
        reqs = getattr(batch, "reqs", None) or ()
        mine = [i for i, r in enumerate(reqs) if isinstance(r.rid, str) and r.rid.startswith(RID_PREFIX)]
        if not mine:
            return 0.0
        lens = getattr(batch, "extend_lens", None)
        if batch.forward_mode in (ForwardMode.EXTEND, ForwardMode.MIXED) and lens and len(lens) == len(reqs) \
                and sum(lens) > 0:  # other modes keep a past prefill's extend_lens
            return sum(lens[i] for i in mine) / sum(lens)
        return len(mine) / len(reqs)

    def status(self) -> dict:
        self._accrue()
        return {"share": self.share(), "charged_s": round(self.charged_s, 3), "balance_s": round(self.balance_s, 3),
                "refused_jobs": self.refused}
