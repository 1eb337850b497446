"""Scheduler side of the quality profiler: its jobs, from making one to keeping its result.

The profiler (:mod:`evicpress_sglang.profiler.runner`, in the HTTP server's process)
measures a codec on a context by asking the context's held-out queries twice: against
the context's exact KV and against its KV after encode -> decode with the codec. Both
are ordinary ``/generate`` requests with the same tokens; what differs is their cache
namespace (:mod:`.profile_job`), whose KV the cache stages when a request asks for it
(:mod:`.profile_copies`).

A job is made for a context that has held-out queries, never profiled ones first; it
pins the context's exact KV on the GPU when there is some, else it will recompute it, and
then needs twice the context within ``profile_reserve`` (a context larger than that gets no
job). Jobs are handed out only while no request waits in the scheduler's queue; a job not
reported in ``JOB_TIMEOUT_S`` is forgotten and its locks and copies released (checked
whenever the cache evicts, so a profiler that stopped does not hold them). A report keeps
the qualities of the variants every request ran on in full; a tainted variant is
discarded, and the outcome says why.
"""

from __future__ import annotations

import itertools
from array import array

import numpy as np
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from . import prefill_timer
from .content_keys import token_hash
from .profile_budget import ProfileBudget
from .profile_copies import ProfileCopies
from .profile_job import REFERENCE, Job, Record, lossy_codecs

JOB_TIMEOUT_S = 600.0
_JOB_IDS = itertools.count(1)
OUTCOMES_KEPT = 16


class ProfileStaging(ProfileCopies):
    def __init__(self, cache) -> None:
        self.cache = cache
        self.jobs: dict[int, Job] = {}
        self.records: dict[int, Record] = {}
        self.refusal: dict | None = None  # why the last job asked for by node could not be made
        self.last_refusal: dict | None = None  # why the last job of either kind could not be made (status)
        self.outcomes: dict[str, dict] = {}  # of the last reported or expired jobs, by job id
        self._ids = _JOB_IDS  # per process, not per cache: a report across a reset cannot hit a new job
        self.counts = {"jobs": 0, "reported": 0, "variants_measured": 0, "variants_tainted": 0, "staged": 0,
                       "expired": 0, "recomputed": 0}
        #: root child keys of profile namespaces (every profile request is matched through
        #: :meth:`ensure` first), so eviction finds them without scanning every root child
        self._tops: dict[object, None] = {}
        self.budget: ProfileBudget = cache.profile_budget  # the cache's: a flush does not refill it

    # -- jobs --------------------------------------------------------------------------

    def prepare(self, want: int, now: float | None = None, idle: bool = True) -> None:
        """Make up to ``want`` jobs for the contexts that most need profiling: never
        profiled first, then those profiled with fewer queries than they now have or longer
        than ``profile_max_age_s`` ago, each group most frequently used first (a popular
        context's reservoir grows with every reuse, and re-profiling it came before every
        context not yet profiled); then, if the model may write questions
        (``profile_self_questions``), contexts nobody has reused yet. Contexts with fewer
        than ``profile_min_tokens`` of their own are passed over (the admin trigger says why).
        None under a policy that does not read qualities (a baseline, or ``off``): there the
        background loop would take GPU time for nothing (the admin trigger still works); none
        while the profiler has spent its ``profile_share`` of GPU time (:mod:`.profile_budget`)."""
        now = self.cache._now() if now is None else now
        self.expire(now)
        if not self._may_make_jobs(idle):
            return
        t, s = self.cache.table, self.cache.settings
        busy = {j.node for j in self.jobs.values()}
        never, again = [], []
        for key in self.cache.queries.contexts():
            if key in busy or key not in t or t.tokens[t.row_of[key]] < s.profile_min_tokens:
                continue
            rec = self.records.get(key)
            if rec is None:
                never.append(t.row_of[key])
            elif now - rec.when >= s.profile_max_age_s or rec.queries < len(self.cache.queries.queries(key)):
                again.append(t.row_of[key])
        groups = [np.array(never, dtype=np.int64), np.array(again, dtype=np.int64)]
        if s.profile_self_questions:
            rows = t.rows()
            groups.append(rows[~t.profiled[rows] & (t.tokens[rows] >= s.profile_min_tokens)])
        for rows in groups:
            for r in rows[np.argsort(-t.frequency(rows, now), kind="stable")]:
                if want <= 0:
                    return
                key = t.keys[r]
                if key in busy or (key in self.records and not self.cache.queries.queries(key)):
                    continue  # running, or written questions were already tried and it is still not reused
                job = self._make(key, now)
                if isinstance(job, str):
                    self.last_refusal = {"node": int(key), "reason": job}
                    continue
                want -= 1
                busy.add(key)

    def _may_make_jobs(self, idle: bool) -> bool:
        """Whether jobs may be made now, alike on every TP rank: this rank is ``idle`` (no
        request waits) under a policy that reads qualities, on every rank, and rank 0's
        budget allows one (its clock and charges decide for all). One collective, reached
        by every rank on every request for jobs, whatever its own answer."""
        prefill_timer.poll()  # the job's last batches are charged before the budget is asked
        here = idle and self.cache.policy is not None and self.cache.policy.uses_quality
        (budget,), (everyone,) = self.cache.sync.agree(bcast=[float(here and self.budget.allows_job())],
                                                       mins=[float(here)])
        return budget > 0 and everyone > 0

    def prepare_for(self, node_id: int) -> Job | None:
        """A job for one context now (the admin trigger), or None with :attr:`refusal` saying why."""
        self.refusal = None
        existing = next((j for j in self.jobs.values() if j.node == node_id and j.asked_for), None)
        if existing is not None:
            return existing
        if node_id not in self.cache.table:
            self.refusal = {"node": node_id, "reason": "no such context in the cache"}
        elif (short := self._too_short(self.cache.nodes.get(node_id))) is not None:  # it holds no queries either
            self.refusal = {"node": node_id, "reason": short}
        elif not self.cache.queries.queries(node_id) and not self.cache.settings.profile_self_questions:
            self.refusal = {"node": node_id, "reason": "no held-out queries yet (the context has not been reused; "
                                                       "profile_self_questions lets the model write some)"}
        else:
            job = self._make(node_id, self.cache._now())
            if isinstance(job, Job):
                job.asked_for = True
                return job
            self.refusal = {"node": node_id, "reason": job}
        self.last_refusal = self.refusal
        return None

    def _too_short(self, node: TreeNode | None) -> str | None:
        """Why ``node`` is not worth a job for its size, if it is not: what its placement moves
        is its own tokens, and a few words split below a document are not worth measuring."""
        if node is not None and not self.cache._holds_queries(node):  # the same bound as for holding queries
            return (f"{len(node.key)} tokens of its own, fewer than profile_min_tokens "
                    f"({self.cache.settings.profile_min_tokens})")
        return None

    def _make(self, key: int, now: float) -> Job | str:
        """A new job for context ``key``: pinned on the GPU when its KV is exact there, to be
        recomputed otherwise; or why there can be none."""
        node = self.cache.nodes.get(key)
        if node is None:
            return "the context is no longer in the cache"
        short = self._too_short(node)
        if short is not None:
            return short
        if node.key.extra_key:  # its namespace: a cache salt, or a LoRA adapter's id (SGLang appends it)
            return ("it lives in a cache namespace (a LoRA adapter or cache salt): the profiler's requests run "
                    "on the base model and would measure something else")
        tokens = self.cache._logical_len(node)
        exact = self._exact_on_gpu(node)
        copies = 1 if exact else 2  # a recomputed reference is held beside each variant's copy
        if copies * tokens > self.reserve_tokens():
            held = "a copy" if exact else "its recomputed exact KV and a copy (it is not exact on the GPU)"
            return (f"{held} of its {tokens} tokens does not fit the profiling reserve ({self.reserve_tokens()} "
                    f"tokens: profile_reserve {self.cache.settings.profile_reserve:g} of the pool)")
        codecs = lossy_codecs(self.cache.table)
        if not codecs:
            return "no lossy codec is enabled: there is nothing to measure"
        queries = [list(q) for q in self.cache.queries.queries(key)]
        job = Job(next(self._ids), key, list(self.cache._path_tokens(node)), queries, [REFERENCE] + codecs, now,
                  extra_key=node.key.extra_key, recompute=not exact, pinned=node if exact else None,
                  write_questions=0 if queries else self.cache.settings.profile_self_questions)
        if exact:
            self.cache.inc_lock_ref(node)
        self.jobs[job.id] = job
        self.counts["jobs"] += 1
        self.counts["recomputed"] += not exact
        return job

    def report(self, job_id: int, quality: dict[int, float], queries: int) -> dict:
        """The profiler's measured quality per variant: kept for the variants that were
        served in full; the job's locks and copies are released either way."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return {"accepted": False, "reason": f"job {job_id} is unknown or expired"}
        self.release(job)
        self.counts["reported"] += 1
        served, tainted = job.served(), job.tainted()
        measured = {}
        for variant, q in quality.items():
            if variant <= 0 or variant >= len(job.codecs):
                continue
            if variant in tainted or variant not in served or 0 in tainted or 0 not in served:
                self.counts["variants_tainted"] += 1
                continue
            measured[job.codecs[variant]] = min(max(float(q), 0.0), 1.0)
        context = self._context_of(job)
        if measured:
            record = Record(self.cache._now(), queries, measured)
            if context is not None:
                self.restore(context, record)
            else:  # dropped while it was measured: remembered by content, as a dropped context's profile is
                self.cache.memory.profiled(token_hash(job.extra_key, job.prefix), record)
            self.counts["variants_measured"] += len(measured)
        elif job.write_questions and context is not None:  # the model wrote nothing usable: not again until reused
            self.records[context] = Record(self.cache._now(), 0, {})
        discarded = sorted(job.codecs[v] for v in quality if 0 < v < len(job.codecs) and job.codecs[v] not in measured)
        outcome = {"accepted": True, "node": job.node, "measured": measured, "discarded": discarded,
                   "reason": (job.reason or "a variant was reported that no request ran on") if discarded else None}
        self._keep_outcome(job.id, outcome)
        return outcome

    def _context_of(self, job: Job) -> int | None:
        """The table row of the job's context: its node, or the node that holds the same tokens
        now (it was dropped and recomputed while the job ran); None when it is not in the tree."""
        if job.node in self.cache.table:
            return job.node
        node = self.cache._find_exact(RadixKey(array("q", job.prefix), job.extra_key))
        return node.id if node is not None and node.id in self.cache.table else None

    def expire(self, now: float) -> None:
        """Forget the jobs not reported in ``JOB_TIMEOUT_S``, releasing their locks and copies."""
        for job in [j for j in self.jobs.values() if now - j.created > JOB_TIMEOUT_S]:
            del self.jobs[job.id]
            self.release(job)
            self.counts["expired"] += 1
            self._keep_outcome(job.id, {"accepted": False, "node": job.node, "measured": {}, "discarded": [],
                                        "reason": f"not reported within {JOB_TIMEOUT_S:g} s; last: {job.reason}"})

    def _keep_outcome(self, job_id: int, outcome: dict) -> None:
        self.outcomes[str(job_id)] = outcome
        while len(self.outcomes) > OUTCOMES_KEPT:
            self.outcomes.pop(next(iter(self.outcomes)))

    def forget(self, key: int) -> "Record | None":
        """Drop context ``key``'s profile; returns it (see :mod:`.memory`)."""
        return self.records.pop(key, None)

    def restore(self, key: int, record: "Record") -> None:
        """Give a context whose node came back its last profile, qualities included."""
        self.records[key] = record
        for codec, q in record.quality.items():
            self.cache.table.set_quality(key, codec, q)

    def measured(self, key: int) -> dict[str, float] | None:
        rec = self.records.get(key)
        return None if rec is None else rec.quality

    def outbox(self) -> dict:
        """What the profiler collects: every job not yet reported, and the last refusal."""
        return {"jobs": [j.to_dict() for j in self.jobs.values()], "refusal": self.refusal, "outcomes": self.outcomes}

    def status(self) -> dict:
        """Counters, what the profiler holds, and why jobs were refused or variants discarded:
        per running job its last refusal or taint, per finished job its outcome."""
        now = self.cache._now()
        return {**self.counts, "active_jobs": len(self.jobs), "held_tokens": self.held_tokens(),
                "reserve_tokens": self.reserve_tokens(), "profiled_contexts": len(self.records),
                "budget": self.budget.status(),
                "refusal": self.last_refusal, "running": [j.summary(now) for j in self.jobs.values()],
                "outcomes": self.outcomes}
