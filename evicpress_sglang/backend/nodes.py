"""What the cache hangs on SGLang's ``TreeNode``: where an evicted node's KV is stored, and
which slots a token-dropped node kept.

A node is in one of three states:

* on the GPU, as stock SGLang has it (``value`` holds one slot per token);
* *dropped*: on the GPU with only the slots of the tokens a dropping codec kept
  (``evp_kept`` holds their positions within the node, ascending);
* a *placeholder*: no slots (``value is None``), its KV a blob in a lower tier
  (``evp`` is a :class:`Stored`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from sglang.srt.mem_cache.radix_cache import TreeNode

from ..codecs import drops_tokens, get_codec
from ..policy import Tier


@dataclass
class Stored:
    """Where a placeholder's KV is: a blob in a tier, encoded with a codec."""

    tier: Tier
    codec: str  # the blob's codec: the configuration's, or keep+<it> for a dropped node's kept tokens
    blob: str  # key in the tier
    #: tokens the blob holds before the node's first one (a shared blob keyed at an anchor
    #: before where this server's match ended): loaded with the rest, then let go
    offset: int = 0

    @property
    def token_subset(self) -> bool:
        """The blob holds a subset of the tokens, with their positions."""
        return drops_tokens(get_codec(self.codec))


class Decoded(NamedTuple):
    k: torch.Tensor  # [layers, slots, heads, head_dim]
    v: torch.Tensor
    nbytes: int  # of the blob
    positions: Optional[torch.Tensor]  # of the slots within the node, for a token subset


def is_placeholder(node: TreeNode) -> bool:
    return getattr(node, "evp", None) is not None


def is_dropped(node: TreeNode) -> bool:
    """On the GPU with only its kept tokens' slots."""
    return getattr(node, "evp_kept", None) is not None


def kept_below(kept: torch.Tensor, split_len: int) -> int:
    """Kept slots of a dropped node before token ``split_len`` (reads the positions back
    from the GPU: only done when such a node is split)."""
    return int((kept < split_len).sum())


def missing_slots(node: TreeNode) -> int:
    """Tokens of the key that have no slot (SGLang counts len(key) per node)."""
    return len(node.key) - len(node.value) if is_dropped(node) else 0
