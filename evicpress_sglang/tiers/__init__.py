"""Where evicted KV lives: pinned host memory and disk (the GPU tier is SGLang's own pool)."""

from .base import StorageTier, TierError, TierFullError, TierUsage
from .disk import DiskTier
from .host import HostTier

__all__ = ["DiskTier", "HostTier", "StorageTier", "TierError", "TierFullError", "TierUsage"]
