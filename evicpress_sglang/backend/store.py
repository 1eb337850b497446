"""Eviction: the policy places every resident context, and the demotions it chose are
carried out here, children before parents: encode a node's KV, hand the blob to its tier,
free the node's pool slots and keep it as a placeholder; or drop it as stock SGLang does.

Nothing here waits for the GPU or the disk: encoding is queued on the current stream and
the tiers copy the blob out behind it (:mod:`evicpress_sglang.tiers.transfer`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.radix_cache import TreeNode

from ..codecs import EncodedKV, get_codec, subset_codec
from ..policy import Tier
from ..tiers import TierError, TierFullError
from . import kv_io
from .nodes import Stored, is_placeholder
from .tree import TreeBookkeeping

log = logging.getLogger(__name__)


class StoreOnEvict(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`: the eviction side."""

    def _evict_with(self, num_tokens: int, protect: Collection[int] = ()) -> EvictResult:
        """Free ``num_tokens`` GPU slots. ``protect``: ids of nodes no decision may touch
        (the chain a load-back is bringing in)."""
        if self.disable or num_tokens <= 0:
            return EvictResult()
        start = time.perf_counter()
        now = self._agree_round()
        freed = self.profiling.evict_idle(num_tokens)  # the profiler's copies go first
        if self.policy is not None and len(self.table) and freed < num_tokens:
            freed += self._evict_by_policy(num_tokens - freed, protect, now)
        if freed < num_tokens:  # policy off, or it could not free enough: stock LRU drop
            freed += super().evict(EvictParams(num_tokens=num_tokens - freed)).num_tokens_evicted
        self.stats.evict_seconds += time.perf_counter() - start
        if self.stats.exporter is not None:
            self.stats.exporter.usage(self._tier_bytes())
        return EvictResult(num_tokens_evicted=freed)

    def _evict_by_policy(self, num_tokens: int, protect: Collection[int], now: float) -> int:
        t = self.table
        rows = t.rows()
        movable = ~t.in_use[rows]
        kept = [t.row_of[i] for i in protect if i in t]
        if kept:
            movable[np.searchsorted(rows, kept)] = False
        cap = np.array([
            max(self._gpu_tokens() - self.profiling.held_tokens() - num_tokens, 0) * self.token_bytes,
            self._plannable(Tier.HOST),
            self._plannable(Tier.DISK),
            self._plannable(Tier.REMOTE),
        ], dtype=np.float64)
        placed, new = self.policy.place(cap, now, movable)
        old = t.assign[placed]
        moves = [(int(r), int(c)) for r, c, o in zip(placed, new, old) if c != o and self._is_demotion(r, o, c)]
        depth = {r: len(self._path(self.nodes[t.keys[r]])) for r, _ in moves}
        # Slowest destination first, so a tier is emptied before it is filled; within one
        # destination, recompressions of what the tier already holds (they free room) before
        # new arrivals, and children before parents (a node leaves the GPU only as a leaf).
        order = sorted(moves, key=lambda m: (-int(t.tier_of[m[1]]), t.tier_of[t.assign[m[0]]] != t.tier_of[m[1]],
                                             -depth[m[0]]))
        freed = 0
        for r, c in order:
            node = self.nodes.get(t.keys[r]) if t.keys[r] is not None else None
            if node is not None and node.id not in protect:
                freed += self._move(node, c)
        return freed

    def _plannable(self, tier: Tier) -> float:
        """Bytes the policy may plan with in a stored tier: its capacity less what the
        policy cannot see (the host arena's 256-byte rounding per blob, file headers,
        zstd blobs larger than estimated) and a 1% margin, so a planned placement fits."""
        store = self.tiers.get(tier)
        if store is None:
            return 0.0
        u = store.usage()
        t = self.table
        rows = t.rows()
        here = rows[t.tier_of[t.assign[rows]] == tier]
        reclaimable = self.dormant_bytes if tier == Tier.DISK else 0  # freed on demand (_free_dormant)
        unseen = max(0.0, u.used_bytes - reclaimable - float(t.sizes[here, t.assign[here]].sum()))
        return max(0.0, 0.99 * u.capacity_bytes - unseen - 512.0 * (u.entries + 16))

    def _is_demotion(self, row: int, old: int, new: int) -> bool:
        """Only moves down are carried out at eviction time (a move up would need a load):
        to a slower tier, or to a smaller codec in the same stored tier. A remote context
        only leaves by being dropped: recompressing it would read it back over the network
        on the scheduler's thread."""
        t_old, t_new = self.table.tier_of[old], self.table.tier_of[new]
        if t_old == Tier.REMOTE:
            return t_new == Tier.DROP
        if t_new != t_old:
            return t_new > t_old
        return t_new != Tier.GPU and self.table.sizes[row, new] < self.table.sizes[row, old]

    def _move(self, node: TreeNode, config: int) -> int:
        """Carry out one demotion; returns GPU tokens freed."""
        target = self.table.configs[config]
        if any(not is_placeholder(c) for c in node.children.values()) and not node.evicted:
            return 0  # a child still on the GPU: not a leaf (the policy's repair should prevent it)
        if target.tier == Tier.DROP:
            return self._drop(node)
        if node.evicted:  # placeholder -> slower tier or harder codec
            return self._restore_and_store(node, target, config)
        return self._store(node, target, config)

    def _drop(self, node: TreeNode) -> int:
        if is_placeholder(node):
            self._drop_placeholder(node)
            self.stats.dropped += 1
            return 0
        if node.lock_ref > 0:
            return 0
        self.stats.dropped += 1
        return self._free_node(node)

    def _store(self, node: TreeNode, target, config: int) -> int:
        if node.lock_ref > 0:
            return 0
        t0 = time.perf_counter()
        self._verify(node, "between insert and eviction")
        positions = getattr(node, "evp_kept", None)
        stored = Stored(target.tier, self._blob_codec(target.codec, positions), self._new_blob_key(target.tier))
        enc = kv_io.encode_from_pool(self.kvpool, node.value, get_codec(stored.codec), positions)
        if not self._put(stored, node, enc, t0):
            return self._drop(node)
        n = len(node.value)
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        node.value = None
        node.evp = stored
        node.evp_kept = None
        self.evictable_size_ -= n
        self._after_store(node, config)
        return n

    def _restore_and_store(self, node: TreeNode, target, config: int) -> int:
        stored: Stored = node.evp
        t0 = time.perf_counter()
        read = self._read(node)
        if not self.sync.all_ok(read is not None):  # a miss on any rank is a miss on every rank
            self._agreed_miss(node)
            return 0
        # The KV is in memory now: free the old blob first, so recompressing inside a full
        # tier does not need room for both copies at once.
        self._tier_delete(stored)
        new = Stored(target.tier, self._blob_codec(target.codec, read.positions), self._new_blob_key(target.tier))
        node.evp = new
        codec = get_codec(new.codec).device_codec
        enc = codec.encode(read.k, read.v, positions=read.positions) if new.token_subset else codec.encode(read.k, read.v)
        if not self._put(new, node, enc, t0):
            self._drop_placeholder(node)  # its KV is gone with the old blob: a miss from now on
            return 0
        self._after_store(node, config)
        return 0

    def _new_blob_key(self, tier: Tier) -> str:
        """A fresh key for a blob only this process's tree points at (the remote tier removes
        such blobs from the shared store when they are deleted; see ``private_key``)."""
        key = uuid.uuid4().hex
        return self.tiers[tier].private_key(key) if tier == Tier.REMOTE else key

    @staticmethod
    def _blob_codec(codec: str, positions: torch.Tensor | None) -> str:
        """A token subset is stored with its positions and is not dropped again (keep+<quantizer>)."""
        return codec if positions is None else subset_codec(codec)

    def _put(self, stored: Stored, node: TreeNode, enc: EncodedKV, started: float) -> bool:
        """Hand a blob (encoded on the device, maybe still in flight) to its tier, which copies
        it out (and entropy-codes it) without the scheduler waiting; the seconds counted since
        ``started`` are the scheduler's own. False when the tier refused it (full, I/O error):
        nothing was stored."""
        codec = get_codec(stored.codec)
        meta = self._disk_meta(node, stored.codec) if stored.tier == Tier.DISK else None  # found by content later
        pack = codec.pack_host if codec.has_host_stage else None
        try:
            try:
                self.tiers[stored.tier].put(stored.blob, enc, meta, pack=pack)
            except TierFullError:
                # Dormant blobs (stored by an earlier process, not asked for since) make room first.
                if stored.tier != Tier.DISK or not self._free_dormant(enc.nbytes + enc.nbytes // 64 + 65536):
                    raise
                self.tiers[stored.tier].put(stored.blob, enc, meta, pack=pack)
            ok = True
        except (TierError, OSError) as e:
            self.health.note_tier_failure(f"{stored.tier.label} put", e)
            self.stats.tier_errors += 1
            ok = False
        agreed = False
        try:
            agreed = self.sync.all_ok(ok)  # stored only if every rank stored its shard
        finally:
            if ok and not agreed:  # refused elsewhere, or another rank failed: no node will point at it
                self._tier_delete(stored)
        if not agreed:
            return False
        self._publish(node, stored.codec, enc, pack)
        self.stats.stored(stored.tier.label, stored.codec, len(node.key), enc.shape.raw_nbytes, enc.nbytes,
                          time.perf_counter() - started)
        return True

    def _after_store(self, node: TreeNode, config: int) -> None:
        r = self.table.row_of[node.id]
        self.table.set_present_quality(r, min(self.table.present_quality[r], self.table.quality[r, config]))
        self.table.assign[r] = config
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
