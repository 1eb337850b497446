"""Where evicted KV lives: pinned host memory, disk and a shared Mooncake Store (the GPU tier
is SGLang's own pool)."""

from .base import StorageTier, TierError, TierFullError, TierUsage
from .disk import DiskTier
from .host import HostTier
from .remote import MooncakeTier, make_remote_tier

__all__ = ["DiskTier", "HostTier", "MooncakeTier", "StorageTier", "TierError", "TierFullError", "TierUsage",
           "make_remote_tier"]
