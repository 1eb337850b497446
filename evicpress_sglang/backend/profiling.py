"""Scheduler side of the quality profiler: degraded copies of a context, served by SGLang.

The profiler (:mod:`evicpress_sglang.profiler.runner`, in the HTTP server's process)
measures a codec on a context by asking the context's held-out queries twice: against
the context's exact KV and against its KV after encode -> decode with the codec. Both
are ordinary ``/generate`` requests with the same tokens; what differs is their cache
namespace (SGLang's ``extra_key``): ``evp-profile:<job>:<variant>``. No such namespace
exists in the tree until a request asks for it; :meth:`ProfileStaging.ensure` then
copies the context's KV from the pool, runs it through the variant's codec on the GPU
(variant 0 is ``bf16``, the exact reference) and inserts it as a node of that namespace,
so SGLang's own match finds it and the request runs on it. Token-dropping codecs give a
dropped node, served through the same physical view as a real load-back.

What keeps user traffic undisturbed and the measurements honest:

* profile nodes are not contexts: no table row, no hits, no held-out queries; they
  are evicted before any user context and never make a user context leave the GPU;
* a variant is staged only from a context whose whole path holds exact KV on the
  GPU; a request that found less than the full variant (not staged, or evicted and not
  restaged) *taints* the variant, and a tainted variant's report is discarded;
* jobs are handed out only while no request waits in the scheduler's queue; a job
  not reported in ``JOB_TIMEOUT_S`` is forgotten and its nodes released.
"""

from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..codecs import get_codec
from ..policy import Tier
from . import kv_io

NAMESPACE = "evp-profile:"
REFERENCE = "bf16"  # variant 0: exact KV through the identity codec
JOB_TIMEOUT_S = 600.0
OUTCOMES_KEPT = 16


def namespace(job: int, variant: int) -> str:
    return f"{NAMESPACE}{job}:{variant}"


def parse_namespace(extra_key: str | None) -> tuple[int, int] | None:
    """(job, variant) of a profile namespace; None for anything else."""
    if not extra_key or not extra_key.startswith(NAMESPACE):
        return None
    job, _, variant = extra_key[len(NAMESPACE):].partition(":")
    try:
        return int(job), int(variant)
    except ValueError:
        return None


def lossy_codecs(table) -> list[str]:
    """The codecs whose quality needs measuring: those that decide a stored configuration's
    quality (:attr:`ContextTable.quality_codec`), lossless ones left out."""
    names = [c for c, tier in zip(table.quality_codec, table.tier_of) if tier not in (Tier.GPU, Tier.DROP)]
    return [n for n in dict.fromkeys(names) if not get_codec(n).lossless]


@dataclass
class Job:
    id: int
    node: int  # the context (radix node id) being profiled
    prefix: list[int]  # its tokens, from the root
    queries: list[list[int]]
    codecs: list[str]  # per variant; 0 is the reference
    created: float
    write_questions: int = 0  # no held-out query yet: the profiler has the model write this many
    asked_for: bool = False  # made for one context on request (not handed to the background loop)
    served: set[int] = field(default_factory=set)  # variants some request ran on in full
    tainted: set[int] = field(default_factory=set)  # variants a request ran on only in part

    def to_dict(self) -> dict:
        return {"job": self.id, "node": self.node, "prefix": self.prefix, "queries": self.queries,
                "codecs": self.codecs, "namespaces": [namespace(self.id, i) for i in range(len(self.codecs))],
                "asked_for": self.asked_for, "write_questions": self.write_questions}


@dataclass
class Record:
    """The last profile of a context."""

    when: float
    queries: int
    quality: dict[str, float]


class ProfileStaging:
    def __init__(self, cache) -> None:
        self.cache = cache
        self.jobs: dict[int, Job] = {}
        self.records: dict[int, Record] = {}
        self.refusal: dict | None = None  # why the last job asked for by node could not be made
        self.outcomes: dict[str, dict] = {}  # of the last reports, by job id
        self._ids = itertools.count(1)
        self.counts = {"jobs": 0, "reported": 0, "variants_measured": 0, "variants_tainted": 0, "staged": 0}
        #: root child keys of profile namespaces (every profile request is matched through
        #: :meth:`ensure` first), so eviction finds them without scanning every root child
        self._tops: dict[object, None] = {}

    # -- jobs --------------------------------------------------------------------------

    def prepare(self, want: int, now: float | None = None) -> None:
        """Make up to ``want`` jobs for the contexts that most need profiling: never
        profiled, profiled with fewer queries than they now have, or profiled longer
        than ``profile_max_age_s`` ago, most frequently used first; then, if the model may
        write questions (``profile_self_questions``), contexts nobody has reused yet.
        None under a policy that does not read qualities (a baseline, or ``off``): there the
        background loop would take GPU time for nothing (the admin trigger still works)."""
        now = self.cache._now() if now is None else now
        self._expire(now)
        if self.cache.policy is None or not self.cache.policy.uses_quality:
            return
        t, s = self.cache.table, self.cache.settings
        busy = {j.node for j in self.jobs.values()}
        due = []
        for key in self.cache.queries.contexts():
            rec = self.records.get(key)
            if key in busy or key not in t or (rec is not None and now - rec.when < s.profile_max_age_s
                                               and rec.queries >= len(self.cache.queries.queries(key))):
                continue
            due.append(key)
        groups = [np.array([t.row_of[k] for k in due], dtype=np.int64)]
        if s.profile_self_questions:
            rows = t.rows()
            groups.append(rows[~t.profiled[rows]])
        for rows in groups:
            for r in rows[np.argsort(-t.frequency(rows, now), kind="stable")]:
                if want <= 0:
                    return
                key = t.keys[r]
                if key in busy or (key in self.records and not self.cache.queries.queries(key)):
                    continue  # running, or written questions were already tried and it is still not reused
                if isinstance(self._make(key, now), Job):
                    want -= 1
                    busy.add(key)

    def prepare_for(self, node_id: int) -> Job | None:
        """A job for one context now (the admin trigger), or None with :attr:`refusal` saying why."""
        self.refusal = None
        existing = next((j for j in self.jobs.values() if j.node == node_id and j.asked_for), None)
        if existing is not None:
            return existing
        if node_id not in self.cache.table:
            self.refusal = {"node": node_id, "reason": "no such context in the cache"}
            return None
        if not self.cache.queries.queries(node_id) and not self.cache.settings.profile_self_questions:
            self.refusal = {"node": node_id, "reason": "no held-out queries yet (the context has not been reused; "
                                                       "profile_self_questions lets the model write some)"}
            return None
        job = self._make(node_id, self.cache._now())
        if isinstance(job, str):
            self.refusal = {"node": node_id, "reason": job}
            return None
        job.asked_for = True
        return job

    def _make(self, key: int, now: float) -> Job | str:
        """A new job for context ``key``, or why there can be none."""
        node = self.cache.nodes.get(key)
        if node is None or not self._exact_on_gpu(node):
            return "its KV is not exact on the GPU (compressed, dropped or offloaded); it is profiled once recomputed"
        tokens = self.cache._logical_len(node)
        if tokens < self.cache.settings.profile_min_tokens:
            return f"{tokens} tokens, fewer than profile_min_tokens ({self.cache.settings.profile_min_tokens})"
        prefix = list(self.cache._path_tokens(node))
        codecs = lossy_codecs(self.cache.table)
        if not codecs:
            return "no lossy codec is enabled: there is nothing to measure"
        queries = [list(q) for q in self.cache.queries.queries(key)]
        job = Job(next(self._ids), key, prefix, queries, [REFERENCE] + codecs, now,
                  write_questions=0 if queries else self.cache.settings.profile_self_questions)
        self.jobs[job.id] = job
        self.counts["jobs"] += 1
        return job

    def _exact_on_gpu(self, node: TreeNode) -> bool:
        """Every node on the path holds exact KV in the pool."""
        t = self.cache.table
        for n in self.cache._path(node):
            if n.value is None or getattr(n, "evp_kept", None) is not None:
                return False
            if n.id in t and t.present_quality[t.row_of[n.id]] < 1.0:
                return False
        return True

    def report(self, job_id: int, quality: dict[int, float], queries: int) -> dict:
        """The profiler's measured quality per variant: kept for the variants that were
        served in full; the job's nodes are released either way."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return {"accepted": False, "reason": f"job {job_id} is unknown or expired"}
        self.release(job)
        self.counts["reported"] += 1
        t = self.cache.table
        measured = {}
        for variant, q in quality.items():
            if variant <= 0 or variant >= len(job.codecs):
                continue
            if variant in job.tainted or variant not in job.served or 0 in job.tainted:
                self.counts["variants_tainted"] += 1
                continue
            measured[job.codecs[variant]] = min(max(float(q), 0.0), 1.0)
        if measured and job.node in t:
            for codec, q in measured.items():
                t.set_quality(job.node, codec, q)
            self.records[job.node] = Record(self.cache._now(), queries, measured)
            self.counts["variants_measured"] += len(measured)
        elif job.write_questions and job.node in t:  # the model wrote nothing usable: not again until reused
            self.records[job.node] = Record(self.cache._now(), 0, {})
        outcome = {"accepted": True, "measured": measured,
                   "discarded": sorted(job.codecs[v] for v in quality if 0 < v < len(job.codecs)
                                       and job.codecs[v] not in measured)}
        self.outcomes[str(job_id)] = outcome
        while len(self.outcomes) > OUTCOMES_KEPT:
            self.outcomes.pop(next(iter(self.outcomes)))
        return outcome

    def _expire(self, now: float) -> None:
        for job in [j for j in self.jobs.values() if now - j.created > JOB_TIMEOUT_S]:
            del self.jobs[job.id]
            self.release(job)

    def forget(self, key: int) -> None:
        self.records.pop(key, None)

    def measured(self, key: int) -> dict[str, float] | None:
        rec = self.records.get(key)
        return None if rec is None else rec.quality

    # -- serving variants ----------------------------------------------------------------

    def ensure(self, key: RadixKey) -> None:
        """Before matching a profile request: stage its variant if it is not in the tree."""
        parsed = parse_namespace(key.extra_key)
        if parsed and len(key):
            self._tops[key.child_key(self.cache.page_size)] = None
        job = self.jobs.get(parsed[0]) if parsed else None
        if job is None or not 0 <= parsed[1] < len(job.codecs) or len(key) < len(job.prefix):
            return
        ns_key = RadixKey(array("q", job.prefix), key.extra_key)
        if self.cache._find_exact(ns_key) is not None:
            return
        # A request of this variant that was served without its copy (tainted) left its
        # whole prompt in the namespace; the copy takes that place in the tree, so the
        # leftovers go first (while a request still runs on them, no copy is staged and
        # this request is tainted too).
        children, child_key = self.cache.root_node.children, ns_key.child_key(self.cache.page_size)
        if child_key in children:
            self._free_subtree(children[child_key], None)
            if child_key in children:
                return
        self._stage(job, parsed[1], ns_key)

    def matched(self, key: RadixKey, logical_len: int) -> None:
        """After matching a profile request: did it find the whole variant?"""
        parsed = parse_namespace(key.extra_key)
        job = self.jobs.get(parsed[0]) if parsed else None
        if job is None:
            return
        (job.served if logical_len >= len(job.prefix) else job.tainted).add(parsed[1])

    def _stage(self, job: Job, variant: int, ns_key: RadixKey) -> bool:
        cache = self.cache
        source = cache.nodes.get(job.node)
        if source is None or not self._exact_on_gpu(source) or cache._logical_len(source) != len(job.prefix):
            return False
        k, v = kv_io.gather(cache.kvpool, torch.cat([n.value for n in cache._path(source)]))
        codec = get_codec(job.codecs[variant]).device_codec
        k, v, positions = kv_io.decode(codec, codec.encode(k, v), k.device)
        n = k.shape[1]
        alloc = cache.token_to_kv_pool_allocator
        if alloc.available_size() < n:
            self.evict_idle(n - alloc.available_size())
        slots = alloc.alloc(n) if alloc.available_size() >= n else None
        if slots is None:  # profiling never evicts user contexts
            return False
        kv_io.scatter(cache.kvpool, slots, k, v)
        node = TreeNode()
        node.parent, node.key, node.value = cache.root_node, ns_key, slots.to(torch.int64)
        node.evp_kept = positions
        cache.root_node.children[ns_key.child_key(cache.page_size)] = node
        cache.evictable_size_ += n
        cache._update_leaf_status(node)
        self.counts["staged"] += 1
        return True

    # -- memory ----------------------------------------------------------------------------

    def _roots(self, jobs: set[int] | None = None) -> list[TreeNode]:
        """The top nodes of profile namespaces (of ``jobs``, or all)."""
        out, children = [], self.cache.root_node.children
        for top in list(self._tops):
            child = children.get(top)
            job = parse_namespace(top[0])[0]
            if child is None and job not in self.jobs:
                del self._tops[top]  # gone, and no request of its job can bring it back
            elif child is not None and (jobs is None or job in jobs):
                out.append(child)
        return out

    def held_tokens(self) -> int:
        """Pool slots held by profile nodes."""
        total, stack = 0, self._roots()
        while stack:
            node = stack.pop()
            total += len(node.value) if node.value is not None else 0
            stack.extend(node.children.values())
        return total

    def evict_idle(self, num_tokens: int) -> int:
        """Free up to ``num_tokens`` slots from unlocked profile nodes, leaves first."""
        freed = 0
        for top in self._roots():
            freed += self._free_subtree(top, num_tokens - freed)
            if freed >= num_tokens:
                break
        return freed

    def release(self, job: Job) -> None:
        for top in self._roots({job.id}):
            self._free_subtree(top, None)

    def _free_subtree(self, node: TreeNode, budget: int | None) -> int:
        """Drop unlocked nodes below and including ``node``, children first, until
        ``budget`` slots are freed (None: all)."""
        freed = 0
        for child in list(node.children.values()):
            if budget is not None and freed >= budget:
                return freed
            freed += self._free_subtree(child, None if budget is None else budget - freed)
        if not node.children and node.lock_ref == 0 and (budget is None or freed < budget):
            freed += self.cache._free_node(node)
        return freed

    def outbox(self) -> dict:
        """What the profiler collects: every job not yet reported, and the last refusal."""
        return {"jobs": [j.to_dict() for j in self.jobs.values()], "refusal": self.refusal, "outcomes": self.outcomes}

    def status(self) -> dict:
        return {**self.counts, "active_jobs": len(self.jobs), "held_tokens": self.held_tokens(),
                "profiled_contexts": len(self.records), "refusal": self.refusal}
