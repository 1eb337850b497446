"""Insert: a finished (or chunked) request's KV goes into the tree under its logical
tokens. Placeholders on its path are revived with the exact KV it just computed (better
than their blob), and token-dropped nodes it recomputed take its full KV."""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from . import dropped
from .nodes import Stored, is_dropped, is_placeholder, kept_below
from .profile_job import parse_namespace
from .tree import TreeBookkeeping


class InsertRevive(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`: the insert side."""

    def _after_insert(self, last: TreeNode | None) -> None:
        if last is not None and last is not self.root_node:
            if parse_namespace(last.key.extra_key) is None:  # profile copies are not contexts
                self._register(last)
            else:
                self.profiling.inserted(last.key.extra_key)
            if self.settings.verify:
                self._fingerprint_path(last)

    def _cache_finished(self, req, is_insert: bool, kv_len_to_handle: int) -> None:
        """SGLang's, with the request's KV inserted under its logical tokens (see
        :meth:`_insert_req`) and only what the tree did not take freed. The caller
        releases the request's lock, whatever happens here."""
        kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :kv_len_to_handle]
        dup_end = held_end = kv_len_to_handle
        more: list[tuple[int, int]] = []
        if is_insert and not self.disable_finished_insert:
            dup_end, held_end, more = self._insert_req(req, kv_len_to_handle, chunked=False)
        start = req.cache_protected_len
        self.token_to_kv_pool_allocator.free_segments(
            [(kv[start:dup_end], start), *((kv[a:b], a) for a, b in more), (kv[held_end:], held_end)])

    def _cache_unfinished(self, req, chunked: bool) -> None:
        """SGLang's, for a request between prefill chunks: insert what is computed, then
        point the request at the tree's slots for it (the tree may hold fewer)."""
        n = len(req.get_fill_ids())
        kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :n]
        dup_end, held_end, more = self._insert_req(req, n, chunked)
        start = req.cache_protected_len
        self.token_to_kv_pool_allocator.free_segments([(kv[start:dup_end], start), *((kv[a:b], a) for a, b in more)])
        new_indices, new_last = self._held_path(req, held_end)
        self.req_to_token_pool.write((req.req_pool_idx, slice(start, len(new_indices))), new_indices[start:])
        req.cache_protected_len = len(new_indices)
        self.inc_lock_ref(new_last)
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = torch.cat([new_indices, kv[len(new_indices):]]) if len(new_indices) < n else new_indices
        req.last_node = new_last

    def _insert_req(self, req, slots: int, chunked: bool) -> tuple[int, int, list[tuple[int, int]]]:
        """Insert the KV in the first ``slots`` slots of ``req``'s row. Returns, in slots:
        where the duplicates of the tree's own slots end (free them), where what the tree
        now holds ends (free from there on), and further duplicates ``[a, b)`` after the
        first (free them too): the tree's own slots of GPU nodes below a node that took the
        request's KV (:meth:`_insert_helper`)."""
        view = dropped.view_of(req)
        kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :slots]
        tokens = dropped.logical_tokens(req, slots)
        if view is None:
            start, base = self.root_node, 0
        else:  # below the deepest dropped node, slots and tokens line up again
            start, base = view.anchor, view.physical_prefix
            tokens = tokens[view.logical_prefix:]
        key = RadixKey(tokens, req.extra_key, is_bigram=self.is_eagle).page_aligned(self.page_size)
        values = kv[base : base + len(key)].to(dtype=torch.int64, copy=True)
        prefix, last = self._insert_helper(start, key, values, getattr(req, "priority", 0) or 0, chunked)
        held = len(key) if self._insert_stop is None else self._insert_stop
        self._after_insert(last)
        return base + prefix, base + held, [(base + a, base + b) for a, b in self._insert_duplicates]

    def _held_path(self, req, slots: int) -> tuple[torch.Tensor, TreeNode]:
        """The tree's slots (and deepest node) for the first ``slots`` slots of ``req``."""
        fill = dropped.logical_tokens(req, slots)
        m = self._match(MatchPrefixParams(key=RadixKey(fill, req.extra_key, is_bigram=self.is_eagle)))
        if len(m.device_indices) != slots:
            raise RuntimeError(f"evicpress: the tree holds {len(m.device_indices)} of the {slots} slots just inserted")
        return m.device_indices, m.last_device_node

    def _insert_helper(self, node: TreeNode, key: RadixKey, value, priority: int = 0, chunked: bool = False):
        """Before SGLang's insert walks the tree, revive the placeholders on the key's path
        with the KV the request has just computed (exact, so better than the blob).

        The request computed the tokens of any dropped node on the path itself, with all
        slots, so the tree's slots there would not line up with its own: an unused dropped
        node takes the request's exact KV. Matched in part (the request left it where no
        split could be matched: no kept slot before that point), its head takes the exact KV
        and the rest stays cached, dropped; only a rest that keeps no slot goes, with its
        subtree. A dropped node in use stops the insert in front of it, and
        ``_insert_stop`` says how many tokens the tree now holds.

        Below a node that took the request's KV, a node already on the GPU keeps its own
        slots: the request's for its tokens are duplicates that SGLang's prefix length
        cannot express (it ends where the first taken KV starts); ``_insert_duplicates``
        lists them."""
        self._insert_stop = None
        self._insert_duplicates: list[tuple[int, int]] = []
        walk, rest, offset = node, key, 0
        revived_from = None
        while len(rest) > 0:
            child = walk.children.get(rest.child_key(self.page_size))
            if child is None:
                break
            n = child.key.match(rest, page_size=self.page_size)
            if revived_from is not None and not is_dropped(child) and not is_placeholder(child):
                self._insert_duplicates.append((offset, offset + n))
            if is_dropped(child):
                if child.lock_ref > 0:
                    self._insert_stop = offset
                    return super()._insert_helper(node, key[:offset], value[:offset], priority, chunked)
                if n < len(child.key):
                    if kept_below(child.evp_kept, n) == len(child.value):  # its rest keeps no slot
                        self._remove_subtree(child)
                        break
                    child = self._cut(child.key, child, n)  # the rest stays cached, dropped
                self._undrop(child, value[offset : offset + n])
                revived_from = offset if revived_from is None else revived_from
            if is_placeholder(child):
                if n < len(child.key):  # only part of it was recomputed: it is a miss
                    self._drop_placeholder(child)
                    break
                self._revive(child, value[offset : offset + n])
                revived_from = offset if revived_from is None else revived_from
            walk, rest, offset = child, rest[n:], offset + n
            if n < len(child.key):
                break
        prefix_len, last = super()._insert_helper(node, key, value, priority, chunked)
        # SGLang frees the caller's slots up to prefix_len as duplicates of the tree's; the
        # revived nodes now own theirs, so only what was on the GPU before counts.
        if revived_from is not None:
            prefix_len = min(prefix_len, revived_from)
        return prefix_len, last

    def _remove_subtree(self, node: TreeNode) -> None:
        """Drop an unlocked node and everything below it (children first)."""
        if is_placeholder(node):
            self._drop_placeholder(node)
            return
        for child in list(node.children.values()):
            self._remove_subtree(child)
        self._drop(node)

    def _undrop(self, node: TreeNode, value: torch.Tensor) -> None:
        """An unused dropped node takes a request's exact KV for all its tokens."""
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        self.evictable_size_ += len(value) - len(node.value)
        node.value, node.evp_kept = value.clone(), None
        if self.settings.verify:  # the reference was of the dropped slots
            node.evp_fp = self._fingerprint(node)
        if node.id in self.table:
            self.table.set_stored_tokens(node.id, len(node.key))
            self.table.set_present_quality(self.table.row_of[node.id], 1.0)

    def _revive(self, node: TreeNode, value: torch.Tensor) -> None:
        stored: Stored = node.evp
        self._tier_delete(stored)
        node.evp = None
        node.value = value.clone()
        if node.id in self.table:
            self.table.set_stored_tokens(node.id, len(node.key))
        if self.settings.verify:
            node.evp_fp = self._fingerprint(node)
        self.evictable_size_ += len(node.key)
        if node.id in self.table:
            self._set_config(node, self.table.gpu_config)
            self.table.set_present_quality(self.table.row_of[node.id], 1.0)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
