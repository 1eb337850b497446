"""Restart: disk blobs written before a restart are re-attached to the new tree as
placeholders, so the first request for a stored context loads it instead of prefilling."""

from __future__ import annotations

import logging
from array import array

from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..policy import Tier
from .nodes import Stored
from .tree import TreeBookkeeping

log = logging.getLogger(__name__)


class RestoreFromDisk(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`."""

    def _restore_from_disk(self) -> None:
        """Re-attach disk blobs written before a restart as placeholders (prefix order);
        a blob whose prefix is not on disk too cannot be used and is deleted."""
        disk = self.tiers.get(Tier.DISK)
        if disk is None:
            return
        entries = []
        for blob in disk.keys():
            meta = disk.meta(blob)
            if not meta or self._config_index(Tier.DISK, str(meta.get("codec"))) is None:
                disk.delete(blob)
                continue
            entries.append((len(meta["tokens"]), blob, meta))
        restored = 0
        for _, blob, meta in sorted(entries, key=lambda e: e[0]):
            tokens = array("q", meta["tokens"])
            own = int(meta["own"])
            key = RadixKey(tokens, meta.get("extra_key"))
            parent = self._find_exact(key[: len(tokens) - own])
            child_key = key[len(tokens) - own :]
            if parent is None or own <= 0 or child_key.child_key(self.page_size) in parent.children:
                disk.delete(blob)
                continue
            node = TreeNode()
            node.parent, node.key, node.value = parent, child_key, None
            node.evp = Stored(Tier.DISK, meta["codec"], blob)
            parent.children[child_key.child_key(self.page_size)] = node
            self._register(node)
            self._set_config(node, self._config_index(Tier.DISK, meta["codec"]))
            restored += 1
        if restored:
            log.info("evicpress: re-attached %d disk entries from %s", restored, disk.root)
