"""The profiler's degraded copies in the radix tree (a mixin of :class:`.profiling.ProfileStaging`).

No profile namespace exists in the tree until a request asks for it; :meth:`ProfileCopies.ensure`
then copies the context's exact KV from the pool, runs it through the variant's codec on the
GPU (variant 0 is ``bf16``, the exact reference) and inserts it as a node of that namespace,
so SGLang's own match finds it and the request runs on it. Token-dropping codecs give a
dropped node, served through the same physical view as a real load-back.

What keeps the measurements honest and user traffic undisturbed:

* profile nodes are not contexts: no table row, no hits, no held-out queries;
* every variant is staged from the same exact KV, locked until the job ends: the context's
  own nodes when its whole path holds exact KV on the GPU, else its reference namespace,
  which SGLang prefills like any miss and which is pinned as soon as it is inserted (a
  user eviction took it as an idle copy between two requests otherwise). Under memory
  pressure most contexts are not exact on the GPU (compressed into host memory or onto
  disk, dropped, or loaded back from a lossy blob): when only exact-on-GPU contexts could
  be profiled, a pressured H200 run measured 4 of 23 reused contexts in 140 s;
* the copy a job is being asked about is locked too: user evictions take idle copies
  first but never that one (they took it between two queries of the same variant). The
  profiler asks about variants one after another, so staging a variant frees the job's
  other copies;
* all copies together hold at most ``profile_reserve`` of the pool. A copy is staged into
  free slots, or into slots the cache frees for it as it would for a user request (idle
  copies, then the policy's ordinary demotions to host memory or disk): when the pool is
  full of user KV that is the only room there is, and the reserve bounds what profiling
  takes from user traffic;
* a request whose last match found less than the full variant *taints* the variant (a
  request matched again while it waits counts with its last match, the one it ran with);
  the job keeps the reason of its last refusal or taint for ``/evicpress/status``.
"""

from __future__ import annotations

import time
from array import array

import torch
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..codecs import get_codec
from . import kv_io
from .profile_job import Job, namespace, parse_namespace


class ProfileCopies:
    """Staging, pinning and freeing the profile namespaces' nodes; the job bookkeeping
    (``cache``, ``jobs``, ``counts``, ``_tops``, ``budget``) is :class:`.profiling.ProfileStaging`'s."""

    def reserve_tokens(self) -> int:
        """Pool slots the profiler's copies may hold at once (``profile_reserve`` of the pool)."""
        return int(self.cache.settings.profile_reserve * self.cache.token_to_kv_pool_allocator.size)

    def _exact_on_gpu(self, node: TreeNode) -> bool:
        """Every node on the path holds exact KV in the pool."""
        t = self.cache.table
        for n in self.cache._path(node):
            if n.value is None or getattr(n, "evp_kept", None) is not None:
                return False
            if n.id in t and t.present_quality[t.row_of[n.id]] < 1.0:
                return False
        return True

    # -- serving variants ----------------------------------------------------------------

    def ensure(self, key: RadixKey) -> str | None:
        """Before matching a profile request: stage its variant if it is not in the tree;
        why it could not be staged, if so."""
        if parse_namespace(key.extra_key) and len(key):
            self._tops[key.child_key(self.cache.page_size)] = None
        found = self._variant_of(key.extra_key)
        if found is None or len(key) < len(found[0].prefix):
            return None
        job, variant = found
        if job.recompute and variant == 0:  # SGLang prefills what is missing; pin it once it exists
            self._pin_reference(job)
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
        return self._stage(job, variant, ns_key)

    def matched(self, key: RadixKey, rid: str, logical_len: int, refusal: str | None) -> None:
        """After matching profile request ``rid``: did it find the whole variant? Its last
        match counts (a waiting request is matched again each time the scheduler tries it).
        ``refusal``: why :meth:`ensure` could not stage the variant just before."""
        found = self._variant_of(key.extra_key)
        if found is None:
            return
        job, variant = found
        if job.recompute and variant == 0:  # found or prefilled by the request itself: exact either way
            logical_len = max(logical_len, len(job.prefix))
        job.last_match[rid] = (variant, logical_len)
        if logical_len < len(job.prefix):
            job.reason = (f"variant {variant} ({job.codecs[variant]}) partly matched: {logical_len} of "
                          f"{len(job.prefix)} tokens" + (f" (staging refused: {refusal})" if refusal else ""))

    def inserted(self, extra_key: str) -> None:
        """A profile request's KV entered the tree: a recomputed reference is pinned at once,
        before the next user eviction takes it as an idle copy."""
        found = self._variant_of(extra_key)
        if found is not None and found[0].recompute and found[1] == 0:
            self._pin_reference(found[0])

    def _variant_of(self, extra_key: str | None) -> tuple[Job, int] | None:
        """The running job and the variant a profile namespace names; None for any other
        namespace (a finished job's, or a variant its job does not have)."""
        parsed = parse_namespace(extra_key)
        job = self.jobs.get(parsed[0]) if parsed else None
        return (job, parsed[1]) if job is not None and 0 <= parsed[1] < len(job.codecs) else None

    def _stage(self, job: Job, variant: int, ns_key: RadixKey) -> str | None:
        """Stage the variant's copy, locked, in place of the job's other copies; None, or why not."""
        started = time.perf_counter()
        try:
            return self._stage_copy(job, variant, ns_key)
        finally:
            self.budget.charge(time.perf_counter() - started)  # the scheduler's time is the profiler's

    def _stage_copy(self, job: Job, variant: int, ns_key: RadixKey) -> str | None:
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
        why there are none."""
        if not self._pin_reference(job):
            return "its recomputed reference is not in the pool (no request made it yet, or it was evicted)"
        if job.pinned is None or not self._exact_on_gpu(job.pinned):
            return "the context's KV is no longer exact on the GPU"
        return torch.cat([n.value for n in self.cache._path(job.pinned)])

    def _pin_reference(self, job: Job) -> bool:
        """A recomputed job's reference is pinned the first time it is in the tree; False
        while it is not (a job on the context's own KV is pinned from the start)."""
        if job.pinned is not None or not job.recompute:
            return True
        node = self._reference(job)
        if node is None:
            return False
        self.cache.inc_lock_ref(node)
        job.pinned = node
        return True

    def _reference(self, job: Job) -> TreeNode | None:
        """The node of the job's reference namespace whose path is exactly its prefix. The
        requests put their questions (and SGLang their answers) after the prefix, so it may
        end inside a node: that node is split there, so that the pin holds the prefix only
        (a pinned tail would count against the reserve until the job ends)."""
        cache = self.cache
        key = RadixKey(array("q", job.prefix), namespace(job.id, 0))
        node = cache.root_node
        while len(key) > 0:
            child = node.children.get(key.child_key(cache.page_size))
            if child is None or child.value is None or getattr(child, "evp_kept", None) is not None:
                return None
            found = child.key.match(key, page_size=cache.page_size)
            if found < min(len(child.key), len(key)):
                return None
            if found < len(child.key):
                child = cache._split_node(child.key, child, found)
            node, key = child, key[found:]
        return None if node is cache.root_node else node

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
