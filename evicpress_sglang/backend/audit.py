"""A full check of the cache's state against SGLang's pool: run after an internal error
(to decide whether the cache can still be trusted) and by the stress tests after every
step. O(tree + pool): never on a hot path."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from .nodes import is_placeholder


def free_slots(allocator) -> torch.Tensor:
    """Every slot the allocator would hand out (free and released pages, expanded to slots)."""
    parts = [t for t in (getattr(allocator, "free_pages", None), getattr(allocator, "release_pages", None))
             if t is not None and t.numel()]
    pages = torch.cat(parts).to("cpu", torch.int64) if parts else torch.empty(0, dtype=torch.int64)
    page = allocator.page_size
    if page == 1:
        return pages
    return (pages[:, None] * page + torch.arange(page)[None, :]).reshape(-1)


class StateAudit(RadixCache):
    """Mixin of :class:`~.cache.EvicPressRadixCache`."""

    def audit(self) -> list[str]:
        """What is wrong with the tree, the table and the size counters (empty: consistent)."""
        problems: list[str] = []
        slots: list[torch.Tensor] = []
        for parent, child in self._edges():
            if child.parent is not parent:
                problems.append(f"node {child.id}: parent link broken")
            if child.value is None:
                if not is_placeholder(child):
                    problems.append(f"node {child.id}: no slots and no stored blob")
                elif child.evp.tier not in self.tiers:
                    problems.append(f"node {child.id}: stored in a tier that is not configured")
            else:
                if is_placeholder(parent):
                    problems.append(f"node {child.id}: on the GPU below placeholder {parent.id}")
                slots.append(child.value.to("cpu", torch.int64))
        recount = self._size_recount()
        if recount != (self.evictable_size_, self.protected_size_):
            problems.append(f"size counters (evictable {self.evictable_size_}, protected {self.protected_size_}) "
                            f"!= recount {recount}")
        held = torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)
        if held.numel() != torch.unique(held).numel():
            problems.append("a pool slot is held by two nodes")
        free = free_slots(self.token_to_kv_pool_allocator)
        if held.numel() and free.numel() and torch.isin(held, free).any():
            problems.append("a slot held by the tree is also free in the allocator")
        detached = sum(not self._attached(node) for node in self.nodes.values())
        if detached:
            problems.append(f"{detached} table contexts are no longer in the tree")
        return problems

    def _edges(self) -> Iterator[tuple[TreeNode, TreeNode]]:
        """Every (parent, child) pair of the tree."""
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                stack.append(child)
                yield node, child

    def _size_recount(self) -> tuple[int, int]:
        """(evictable, protected) slots, counted from the tree."""
        evictable = protected = 0
        for _, child in self._edges():
            if child.value is not None:
                if child.lock_ref > 0:
                    protected += len(child.value)
                else:
                    evictable += len(child.value)
        return evictable, protected

    def _attached(self, node: TreeNode) -> bool:
        while node is not self.root_node:
            parent = node.parent
            if parent is None or parent.children.get(node.key.child_key(self.page_size)) is not node:
                return False
            node = parent
        return True
