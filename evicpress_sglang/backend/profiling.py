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

* profile nodes are not contexts: no table row, no hits, no held-out queries;
* a job pins its context on the GPU (a lock, as a running request holds) from the moment
  it is made, when the context's whole path holds exact KV, until it is reported or
  times out, so every variant is staged from the same exact KV even when user traffic
  evicts everything else (without it, under memory pressure the policy moved the context
  to host memory between two of the job's requests and the next variant could not be
  staged);
* a context whose KV is not exact on the GPU (compressed into host memory or onto disk,
  dropped, or loaded back from a lossy blob) is *recomputed*: its reference namespace is
  not staged but prefilled by SGLang like any miss, and that exact KV, pinned once it
  exists, is what the degraded copies are made from. Under memory pressure that is most
  contexts: when only exact-on-GPU contexts could be profiled, a pressured H200 run
  measured 4 of 23 reused contexts in 140 s. Such a job holds two copies at once (the
  reference and one variant), so it needs twice the context's tokens within the reserve;
* the copy a job is being asked about is locked too: user evictions take idle copies
  first but never that one (they took it between two queries of the same variant). The
  profiler asks about variants one after another, so staging a variant frees the job's
  other copies;
* all copies together hold at most ``profile_reserve`` of the pool. A copy is staged into
  free slots, or into slots the cache frees for it as it would for a user request (idle
  copies, then the policy's ordinary demotions to host memory or disk): when the pool is
  full of user KV that is the only room there is, and the reserve bounds what profiling
  takes from user traffic. A context larger than the reserve gets no job;
* a request whose last match found less than the full variant *taints* the variant, and
  a tainted variant's report is discarded (a request matched again while it waits counts
  with its last match, the one it ran with). Each job keeps the reason of its last
  refusal or taint for ``/evicpress/status``;
* jobs are handed out only while no request waits in the scheduler's queue; a job not
  reported in ``JOB_TIMEOUT_S`` is forgotten and its locks and copies released (checked
  whenever the cache evicts, so a profiler that stopped does not hold them).
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
from .content_keys import token_hash

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
    extra_key: str | None = None  # the context's namespace (its content key with the prefix)
    recompute: bool = False  # the reference is prefilled in its namespace, not copied from the context
    pinned: TreeNode | None = field(default=None, repr=False)  # the exact source of the copies, locked
    write_questions: int = 0  # no held-out query yet: the profiler has the model write this many
    asked_for: bool = False  # made for one context on request (not handed to the background loop)
    copy: TreeNode | None = field(default=None, repr=False)  # the staged copy it holds locked now
    last_match: dict[str, tuple[int, int]] = field(default_factory=dict)  # per request id: (variant, tokens found)
    reason: str | None = None  # its last staging refusal or taint, for status

    def served(self) -> set[int]:
        """Variants some request ran on in full."""
        return {v for v, found in self.last_match.values() if found >= len(self.prefix)}

    def tainted(self) -> set[int]:
        """Variants some request ran on only in part."""
        return {v for v, found in self.last_match.values() if found < len(self.prefix)}

    def to_dict(self) -> dict:
        return {"job": self.id, "node": self.node, "prefix": self.prefix, "queries": self.queries,
                "codecs": self.codecs, "namespaces": [namespace(self.id, i) for i in range(len(self.codecs))],
                "asked_for": self.asked_for, "write_questions": self.write_questions, "recompute": self.recompute,
                "reason": self.reason}

    def summary(self, now: float) -> dict:
        """What status shows of a running job (no tokens)."""
        return {"job": self.id, "node": self.node, "codecs": self.codecs, "age_s": round(now - self.created, 1),
                "recompute": self.recompute, "served": sorted(self.served()), "tainted": sorted(self.tainted()), "reason": self.reason}


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
        self.last_refusal: dict | None = None  # why the last job of either kind could not be made (status)
        self.outcomes: dict[str, dict] = {}  # of the last reported or expired jobs, by job id
        self._ids = itertools.count(1)
        self.counts = {"jobs": 0, "reported": 0, "variants_measured": 0, "variants_tainted": 0, "staged": 0,
                       "expired": 0, "recomputed": 0}
        #: root child keys of profile namespaces (every profile request is matched through
        #: :meth:`ensure` first), so eviction finds them without scanning every root child
        self._tops: dict[object, None] = {}

    def reserve_tokens(self) -> int:
        """Pool slots the profiler's copies may hold at once (``profile_reserve`` of the pool)."""
        return int(self.cache.settings.profile_reserve * self.cache.token_to_kv_pool_allocator.size)

    # -- jobs --------------------------------------------------------------------------

    def prepare(self, want: int, now: float | None = None) -> None:
        """Make up to ``want`` jobs for the contexts that most need profiling: never
        profiled first, then those profiled with fewer queries than they now have or longer
        than ``profile_max_age_s`` ago, each group most frequently used first (a popular
        context's reservoir grows with every reuse, and re-profiling it came before every
        context not yet profiled); then, if the model may write questions
        (``profile_self_questions``), contexts nobody has reused yet. Contexts with fewer
        than ``profile_min_tokens`` of their own are passed over (the admin trigger says why).
        None under a policy that does not read qualities (a baseline, or ``off``): there the
        background loop would take GPU time for nothing (the admin trigger still works)."""
        now = self.cache._now() if now is None else now
        self.expire(now)
        if self.cache.policy is None or not self.cache.policy.uses_quality:
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
            groups.append(rows[~t.profiled[rows]])
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

    def prepare_for(self, node_id: int) -> Job | None:
        """A job for one context now (the admin trigger), or None with :attr:`refusal` saying why."""
        self.refusal = None
        existing = next((j for j in self.jobs.values() if j.node == node_id and j.asked_for), None)
        if existing is not None:
            return existing
        if node_id not in self.cache.table:
            self.refusal = {"node": node_id, "reason": "no such context in the cache"}
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

    def _make(self, key: int, now: float) -> Job | str:
        """A new job for context ``key``: pinned on the GPU when its KV is exact there, to be
        recomputed otherwise; or why there can be none."""
        node = self.cache.nodes.get(key)
        if node is None:
            return "the context is no longer in the cache"
        least = self.cache.settings.profile_min_tokens
        if len(node.key) < least:  # what its placement moves: a few words split below a document are not worth a job
            return f"{len(node.key)} tokens of its own, fewer than profile_min_tokens ({least})"
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
        served in full; the job's locks and copies are released either way."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return {"accepted": False, "reason": f"job {job_id} is unknown or expired"}
        self.release(job)
        self.counts["reported"] += 1
        t = self.cache.table
        served, tainted = job.served(), job.tainted()
        measured = {}
        for variant, q in quality.items():
            if variant <= 0 or variant >= len(job.codecs):
                continue
            if variant in tainted or variant not in served or 0 in tainted:
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

    # -- serving variants ----------------------------------------------------------------

    def ensure(self, key: RadixKey) -> str | None:
        """Before matching a profile request: stage its variant if it is not in the tree;
        why it could not be staged, if so."""
        parsed = parse_namespace(key.extra_key)
        if parsed and len(key):
            self._tops[key.child_key(self.cache.page_size)] = None
        job = self.jobs.get(parsed[0]) if parsed else None
        if job is None or not 0 <= parsed[1] < len(job.codecs) or len(key) < len(job.prefix):
            return None
        if job.recompute and parsed[1] == 0:  # SGLang prefills what is missing; pin it once it exists
            self._source(job)
            return None
        ns_key = RadixKey(array("q", job.prefix), key.extra_key)
        if self.cache._find_exact(ns_key) is not None:
            return None
        # A request of this variant that was served without its copy (tainted) left its
        # whole prompt in the namespace; the copy takes that place in the tree, so the
        # leftovers go first (while a request still runs on them, no copy is staged and
        # this request is tainted too).
        children, child_key = self.cache.root_node.children, ns_key.child_key(self.cache.page_size)
        if child_key in children:
            self._free_subtree(children[child_key], None)
            if child_key in children:
                return "a tainted request still runs in its namespace"
        return self._stage(job, parsed[1], ns_key)

    def matched(self, key: RadixKey, rid: str, logical_len: int, refusal: str | None) -> None:
        """After matching profile request ``rid``: did it find the whole variant? Its last
        match counts (a waiting request is matched again each time the scheduler tries it).
        ``refusal``: why :meth:`ensure` could not stage the variant just before."""
        parsed = parse_namespace(key.extra_key)
        job = self.jobs.get(parsed[0]) if parsed else None
        if job is None:
            return
        if job.recompute and parsed[1] == 0:  # found or prefilled by the request itself: exact either way
            logical_len = max(logical_len, len(job.prefix))
        job.last_match[rid] = (parsed[1], logical_len)
        if logical_len < len(job.prefix):
            job.reason = (f"variant {parsed[1]} ({job.codecs[parsed[1]]}) partly matched: {logical_len} of "
                          f"{len(job.prefix)} tokens" + (f" (staging refused: {refusal})" if refusal else ""))

    def inserted(self, extra_key: str) -> None:
        """A profile request's KV entered the tree: a recomputed reference is pinned at once,
        before the next user eviction takes it as an idle copy."""
        parsed = parse_namespace(extra_key)
        job = self.jobs.get(parsed[0]) if parsed else None
        if job is not None and job.recompute and parsed[1] == 0 and job.pinned is None:
            self._source(job)

    def _stage(self, job: Job, variant: int, ns_key: RadixKey) -> str | None:
        """Stage the variant's copy, locked, in place of the job's other copies; None, or why not."""
        cache = self.cache
        source = self._source(job)
        if isinstance(source, str):
            return source
        self._free_copies(job)  # the profiler is done with the job's other variants
        need, reserve = len(job.prefix), self.reserve_tokens()
        if self.held_tokens() + need > reserve:
            self.evict_idle(self.held_tokens() + need - reserve)
        if self.held_tokens() + need > reserve:
            return f"the profiling reserve is full ({self.held_tokens()} of {reserve} tokens held, {need} needed)"
        alloc = cache.token_to_kv_pool_allocator
        if alloc.available_size() < need:  # room as for a user request: idle copies, then the policy's demotions
            cache._evict_with(need - alloc.available_size())
        if alloc.available_size() < need:
            return f"pool full: {alloc.available_size()} of {need} slots free after eviction"
        k, v = kv_io.gather(cache.kvpool, source)
        codec = get_codec(job.codecs[variant]).device_codec
        k, v, positions = kv_io.decode(codec, codec.encode(k, v), k.device)
        n = k.shape[1]
        slots = alloc.alloc(n)
        kv_io.scatter(cache.kvpool, slots, k, v)
        node = TreeNode()
        node.parent, node.key, node.value = cache.root_node, ns_key, slots.to(torch.int64)
        node.evp_kept = positions
        cache.root_node.children[ns_key.child_key(cache.page_size)] = node
        cache.evictable_size_ += n
        cache._update_leaf_status(node)
        cache.inc_lock_ref(node)
        job.copy = node
        self.counts["staged"] += 1
        return None

    def _source(self, job: Job) -> torch.Tensor | str:
        """Pool slots of the exact KV of the job's prefix, kept locked until the job ends; or
        why there are none. A recomputed job pins its reference the first time it is found."""
        cache = self.cache
        if job.pinned is None and job.recompute:
            node = self._reference(job)
            if node is None:
                return "its recomputed reference is not in the pool (no request made it yet, or it was evicted)"
            cache.inc_lock_ref(node)
            job.pinned = node
        if job.pinned is None or not self._exact_on_gpu(job.pinned):
            return "the context's KV is no longer exact on the GPU"
        return torch.cat([n.value for n in cache._path(job.pinned)])[: len(job.prefix)]

    def _reference(self, job: Job) -> TreeNode | None:
        """The first node of the job's reference namespace whose path covers its whole prefix
        (requests put their questions after it, so the prefix may end inside a node)."""
        key = RadixKey(array("q", job.prefix), namespace(job.id, 0))
        node = self.cache.root_node
        while len(key) > 0:
            child = node.children.get(key.child_key(self.cache.page_size))
            if child is None or child.value is None or getattr(child, "evp_kept", None) is not None:
                return None
            found = child.key.match(key, page_size=self.cache.page_size)
            if found < min(len(child.key), len(key)):
                return None
            node, key = child, key[found:]
        return None if node is self.cache.root_node else node

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
        """A job ends: its source is unpinned and its copies go (a recomputed reference too)."""
        if job.pinned is not None:
            self.cache.dec_lock_ref(job.pinned)
            job.pinned = None
        self._free_copies(job)

    def _free_copies(self, job: Job) -> None:
        """Unlock the job's copy and free its namespaces' nodes that no request holds."""
        if job.copy is not None:
            self.cache.dec_lock_ref(job.copy)
            job.copy = None
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
        """Counters, what the profiler holds, and why jobs were refused or variants discarded:
        per running job its last refusal or taint, per finished job its outcome."""
        now = self.cache._now()
        return {**self.counts, "active_jobs": len(self.jobs), "held_tokens": self.held_tokens(),
                "reserve_tokens": self.reserve_tokens(), "profiled_contexts": len(self.records),
                "refusal": self.last_refusal, "running": [j.summary(now) for j in self.jobs.values()],
                "outcomes": self.outcomes}
