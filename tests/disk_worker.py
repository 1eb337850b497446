"""A process that stores contexts on disk and dies with SIGKILL (for test_content_keys.py).

Usage: python tests/disk_worker.py DISK_DIR N
Serves N documents under a shared system prompt, moves them to disk (the prompt stays on
the GPU), waits for the writes, queues one more document's write and kills itself
before it can finish cleanly: what a crash leaves behind.
"""

import os
import signal
import sys

from content_key_setup import DOCS, SYSTEM, settings
from harness import make_params, serve
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.policy import Tier


def main() -> None:
    disk_dir, n = sys.argv[1], int(sys.argv[2])
    cache = EvicPressRadixCache(make_params(1024), settings(disk_dir))
    serve(cache, SYSTEM)
    prompt = next(iter(cache.root_node.children.values()))
    cache.inc_lock_ref(prompt)  # the system prompt stays on the GPU, as a busy server's would
    for doc in DOCS[:n]:
        serve(cache, SYSTEM + doc + [7])
        cache.evict(EvictParams(num_tokens=10**6))
    cache.tiers[Tier.DISK].flush()
    print("stored", cache.tiers[Tier.DISK].usage().entries, flush=True)
    serve(cache, SYSTEM + DOCS[n] + [7])
    cache.evict(EvictParams(num_tokens=10**6))  # this write may be in flight when the process dies
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
