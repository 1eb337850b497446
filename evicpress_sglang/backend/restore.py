"""Stored contexts found by content: disk blobs that no placeholder points at (written
before a restart, or by another process on the same directory) wait in a *dormant* index
by the hash of the prefix they continue. When a request's match ends where a dormant blob
starts and the request continues with that blob's tokens, the blob is attached to the
tree as a placeholder and loaded back like any other.

A blob of another model, layout or shard (another fingerprint) is never attached, nor
deleted: it may be another server's. Dormant blobs are the first to go when the disk
tier needs room.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass

from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..policy import Tier
from .nodes import Stored
from .tree import TreeBookkeeping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dormant:
    blob: str
    codec: str
    tokens: array  # the context's own tokens (after the prefix it continues)
    extra_key: str | None
    nbytes: int  # on disk


class RestoreFromDisk(TreeBookkeeping):
    """Mixin of :class:`~.cache.EvicPressRadixCache`."""

    def _restore_from_disk(self) -> None:
        """Index the disk's blobs of this fingerprint as dormant; attach nothing yet."""
        self.dormant: dict[str, list[Dormant]] = {}
        self.dormant_bytes = 0
        disk = self.tiers.get(Tier.DISK)
        if disk is None:
            return
        foreign = 0
        for blob in disk.keys():
            meta = disk.meta(blob) or {}
            try:
                if meta.get("fp") != self.fingerprint or self._config_index(Tier.DISK, str(meta["codec"])) is None:
                    raise ValueError("another model, layout or codec")
                entry = Dormant(blob, str(meta["codec"]), array("q", meta["tokens"]), meta.get("extra_key"),
                                disk.entry_bytes(blob))
                start_hash = str(meta["start_hash"])
            except (KeyError, TypeError, ValueError, OverflowError):  # not ours to use: left alone
                foreign += 1
                continue
            self._add_dormant(start_hash, entry)
        n = sum(len(v) for v in self.dormant.values())
        if n or foreign:
            log.info("evicpress: %d stored contexts found in %s (%d of another model/layout/codec left alone)",
                     n, disk.root, foreign)

    def _add_dormant(self, start_hash: str, entry: Dormant) -> None:
        self.dormant.setdefault(start_hash, []).append(entry)
        self.dormant_bytes += entry.nbytes

    def _disk_meta(self, node: TreeNode, codec: str) -> dict:
        """What a disk blob of ``node`` carries so that any later process finds it by content."""
        return {"fp": self.fingerprint, "codec": codec, "start_hash": self._start_hash(node.parent, node.key.extra_key),
                "tokens": list(node.key.token_ids), "extra_key": node.key.extra_key}

    def _attach_dormant(self, node: TreeNode, key: RadixKey) -> TreeNode | None:
        """The dormant blob continuing the path at ``node`` that shares the most leading
        tokens with ``key``, attached as a placeholder child of ``node`` (a request that
        needs only part of it loads it and splits it); None if there is none."""
        found = self._find_dormant(node, key)
        return None if found is None else self._attach_dormant_entry(node, *found)

    def _find_dormant(self, node: TreeNode, key: RadixKey) -> tuple[str, Dormant] | None:
        """:meth:`_attach_dormant`'s choice and its index key, changing nothing (ranks agree on it first)."""
        if not self.dormant or len(key) == 0:
            return None
        start_hash = self._start_hash(node, key.extra_key)
        found = self.dormant.get(start_hash)
        if not found or key.child_key(self.page_size) in node.children:
            return None
        best, shared = None, 0
        for entry in found:
            candidate = RadixKey(entry.tokens, entry.extra_key)
            n = candidate.match(key, page_size=self.page_size)
            if n > shared:
                best, shared = entry, n
        return None if best is None else (start_hash, best)

    def _attach_dormant_entry(self, node: TreeNode, start_hash: str, entry: Dormant) -> TreeNode:
        self.dormant[start_hash].remove(entry)
        self.dormant_bytes -= entry.nbytes
        self.stats.found_by_content += 1
        return self._attach_placeholder(node, RadixKey(entry.tokens, entry.extra_key),
                                        Stored(Tier.DISK, entry.codec, entry.blob),
                                        self._config_index(Tier.DISK, entry.codec))

    def _free_dormant(self, nbytes: int) -> bool:
        """Delete dormant blobs (oldest index entries first) until ``nbytes`` more fit on
        disk; False if there were not enough."""
        disk = self.tiers[Tier.DISK]
        while disk.usage().free_bytes < nbytes and self.dormant:
            start, entries = next(iter(self.dormant.items()))
            entry = entries.pop(0)
            self.dormant_bytes -= entry.nbytes
            if not entries:
                del self.dormant[start]
            self._tier_delete(Stored(Tier.DISK, entry.codec, entry.blob))
        return disk.usage().free_bytes >= nbytes
