"""Load-back: a request matched through placeholders gets their KV decoded into fresh
pool slots, ancestors first, before it runs.

A missing, damaged, foreign or undecodable blob is a miss: the placeholder and everything
below it leave the tree and the request recomputes those tokens. Nothing here waits for
the GPU: the copy and the decode are queued on the current stream.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams
from sglang.srt.mem_cache.radix_cache import TreeNode

from ..codecs import CodecError, EncodedKV, get_codec
from ..policy import Tier
from ..tiers.transfer import to_device
from . import kv_io
from .nodes import Decoded, Stored, is_placeholder
from .shared import remote_read_name
from .store import StoreOnEvict


class LoadBack(StoreOnEvict):
    """Mixin of :class:`~.cache.EvicPressRadixCache`: the load-back side."""

    def _load_back(self, params: InitLoadBackParams) -> tuple[torch.Tensor, TreeNode]:
        chain = []
        node = params.best_match_node
        while node is not self.root_node and is_placeholder(node):
            chain.append(node)
            node = node.parent
        chain.reverse()
        anchor = getattr(params.req, "last_node", None)
        if anchor is not None and node is not anchor:
            # The tree changed since this request was matched (another request loaded,
            # revived or dropped part of the path): indices from here would not line up
            # with the request's positions. Load nothing; it recomputes the rest.
            self.stats.stale_load_backs += 1
            return self._no_slots(), anchor
        loaded: list[torch.Tensor] = []
        held: list[TreeNode] = []
        last = node  # the deepest GPU node
        wanted = params.host_hit_length  # tokens; a dropped node yields fewer slots
        # Making room for one node must not demote or drop the nodes of the chain still
        # to come: their loads would find no blob.
        protect = {p.id for p in chain}
        try:
            for p in chain:
                if not is_placeholder(p) or p.parent is not last:
                    break  # gone or changed under us (cannot happen while protected; never trusted)
                slots = self._load(p, protect)
                if slots is None:
                    break
                self.inc_lock_ref(p)  # keep it while later loads may evict
                held.append(p)
                loaded.append(slots)
                last = p
            got = sum(len(p.key) for p in held)
            if got > wanted:  # the last node was matched only in part: split it
                keep = len(last.key) - (got - wanted)
                if self._splittable(last, keep):
                    last = self._split_node(last.key, last, keep)
                    loaded[-1] = last.value
                else:  # a token subset with nothing (or everything) below the split: unused
                    loaded.pop()
                    last = last.parent
        finally:
            for p in held:
                self.dec_lock_ref(p)
        if params.req is not None and loaded:
            self._adopt_view(params.req, last)
        if not loaded:
            return self._no_slots(), last
        return torch.cat(loaded), last

    def _no_slots(self) -> torch.Tensor:
        return torch.empty((0,), dtype=torch.int64, device=self.device)

    def _fetch(self, node: TreeNode) -> Optional[EncodedKV]:
        """A placeholder's blob, on the cache's device (the copy may still be in flight) and
        checked against the node; None on a missing, damaged or foreign blob, and then the
        placeholder is gone (a miss)."""
        stored: Stored = node.evp
        tier = self.tiers.get(stored.tier)
        try:
            if tier is None:
                raise CodecError(f"no {stored.tier.label} tier")
            codec = get_codec(stored.codec)
            unpack = codec.unpack_host if codec.has_host_stage else None
            read_ahead = stored.tier == Tier.REMOTE and self.prefetch.result(remote_read_name(stored))[0]
            if read_ahead:  # read by a prefetch worker (see .prefetch): only the copy to the device is left
                enc = self._take_remote(stored)
                enc = None if enc is None else EncodedKV(enc.codec, enc.shape, to_device(enc.payload, self.device))
            else:
                enc = tier.get(stored.blob, device=self.device, unpack=unpack)
            if enc is None:
                raise CodecError("missing or damaged blob")
            held = enc.shape.tokens - stored.offset
            if held > len(node.key) or (held < len(node.key) and not stored.token_subset):
                raise CodecError(f"blob holds {held} tokens for the node, which has {len(node.key)}")
        except (CodecError, OSError) as e:  # the tiers report I/O faults as misses; a stray one is one too
            self._miss(node, str(e))
            return None
        return enc

    def _miss(self, node: TreeNode, why: str) -> None:
        self.stats.miss(node.evp.tier.label, why)
        self._drop_placeholder(node)

    def _read(self, node: TreeNode) -> Optional[Decoded]:
        """A placeholder's KV decoded into fresh tensors (to be stored again); None on a miss."""
        enc = self._fetch(node)
        if enc is None:
            return None
        try:
            k, v, positions = kv_io.decode(get_codec(node.evp.codec).device_codec, enc, self.device)
        except CodecError as e:
            self._miss(node, str(e))
            return None
        cut = node.evp.offset  # tokens before the node's own (never with a token subset)
        return Decoded(k[:, cut:], v[:, cut:], enc.nbytes, positions)

    def _load(self, node: TreeNode, protect: set[int]) -> Optional[torch.Tensor]:
        """Decode one placeholder straight into new pool slots; None on a miss or when no
        room is left. Under TP it counts only if it worked on every rank: ranks agree that
        every blob was found before making room (so all evict alike), and that every decode
        worked before any rank commits (frees the blob, points the node at the slots);
        otherwise the ranks that decoded free their slots, and a miss anywhere removes the
        placeholder everywhere."""
        stored: Stored = node.evp
        t0 = time.perf_counter()
        enc = self._fetch(node)
        if not self.sync.all_ok(enc is not None):
            self._agreed_miss(node)
            return None
        codec = get_codec(stored.codec)
        n = codec.device_codec.output_shape(enc.shape).tokens  # fewer than len(node.key) for a token subset
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            self._evict_with(n, protect=protect)
            if node.evp is not stored:  # its blob was reported lost meanwhile and it left the tree (a miss)
                return None
        slots = allocator.alloc(n)
        if slots is None:
            return None  # no room even after eviction (alike on every rank): the request recomputes the rest
        try:
            positions = kv_io.decode_into_pool(self.kvpool, slots, codec, enc)
            decoded = True
        except CodecError as e:  # checked before anything was written: the slots go back untouched
            allocator.free(slots)
            self._miss(node, str(e))
            decoded = False
        if not self.sync.all_ok(decoded):
            if decoded:
                allocator.free(slots)
            self._agreed_miss(node)
            return None
        if stored.offset:  # the blob's tokens before the node's first one: let go
            allocator.free(slots[: stored.offset])
            slots = slots[stored.offset:]
            n -= stored.offset
        self._tier_delete(stored)
        node.value = slots.to(torch.int64)
        node.evp = None
        node.evp_kept = positions
        if positions is not None:
            self.table.set_stored_tokens(node.id, n)
        if codec.lossless:
            self._verify(node, "by store + load-back")
        elif self.settings.verify:
            node.evp_fp = self._fingerprint(node)  # lossy: the reference is what came back
        self.evictable_size_ += n
        self._set_config(node, self.table.gpu_config)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        self.stats.loaded(stored.tier.label, stored.codec, len(node.key), enc.nbytes, time.perf_counter() - t0)
        return node.value
