"""Debug checks (setting ``verify``): a fingerprint of each node's KV taken at insert,
compared at eviction and after a lossless load-back; mismatches are counted in status."""

from __future__ import annotations

import logging

from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from . import kv_io

log = logging.getLogger(__name__)


class KVVerification(RadixCache):
    """Mixin of :class:`~.cache.EvicPressRadixCache`."""

    def _fingerprint(self, node: TreeNode) -> tuple[float, float]:
        k, v = kv_io.gather(self.kvpool, node.value)
        return float(k.double().sum()), float(v.double().sum())

    def _fingerprint_path(self, node: TreeNode) -> None:
        while node is not self.root_node and not node.evicted:
            if getattr(node, "evp_fp", None) is None:
                node.evp_fp = self._fingerprint(node)
            node = node.parent

    def _verify(self, node: TreeNode, when: str) -> None:
        """With ``verify`` on: the node's KV in the pool must still be what was inserted."""
        want = getattr(node, "evp_fp", None)
        if not self.settings.verify or want is None or node.value is None:
            return
        got = self._fingerprint(node)
        if got != want:
            self.stats.verify_mismatches += 1
            log.error("evicpress verify: KV of node %d (%d tokens) changed %s: %s != %s", node.id, len(node.key),
                      when, got, want)
