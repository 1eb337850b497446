"""Servers for test_shared_store.py, each in its own process (a Mooncake client's segment
holds what it stored, and a client of a dead store retries for minutes when closed, so the
test kills these instead of closing them).

    python tests/shared_worker.py publish CONFIG_JSON N   # server A: store and publish N documents
    python tests/shared_worker.py outage CONFIG_JSON N    # server B: after a line on stdin, ask for N
"""

import json
import sys
import time

import torch
from content_key_setup import DOCS, SYSTEM, TOKEN_BYTES
from harness import expected_kv, make_params, serve
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.settings import Settings


#: Every shared document starts with this header, so server A's tree (which has seen several)
#: splits after it while server B's (which has seen none) ends its match before it.
HEADER = [9] * 5
#: Shared contexts are keyed every 32 tokens here (256 by default), as the documents are short.
ANCHOR = 32


def server(remote: dict, **settings) -> EvicPressRadixCache:
    """A server on the shared store. Its prefill is priced as an 8B model's (1 ms per token
    here), so a request waits for the store about as long as a real one would for contexts
    of these tests' length (60 tokens) instead of the CPU stand-in's microseconds."""
    return EvicPressRadixCache(make_params(1024), Settings(**{
        "policy": "static:int8", "host_bytes": 2000 * TOKEN_BYTES, "host_codecs": ["bf16", "int8"],
        "remote": {"anchor_tokens": ANCHOR, **remote}, "prefill_s_per_token": 1e-3, **settings}))


def outage(cache: EvicPressRadixCache, n: int) -> None:
    """Once told the store is gone: serve n documents; report how long it took and what came back."""
    serve(cache, SYSTEM)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    results = []
    for doc in DOCS[:n]:
        tokens = SYSTEM + HEADER + doc + [8]
        r = serve(cache, tokens)
        results.append({"loaded": r.loaded, "exact": bool(torch.equal(r.k, expected_kv(tokens)[0]))})
    print(json.dumps({"seconds": time.monotonic() - start, "results": results,
                      "internal_errors": cache.health.internal_errors}), flush=True)
    sys.stdin.read()


def main() -> None:
    mode, remote, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    cache = server(remote)
    if mode == "outage":
        return outage(cache, n)
    serve(cache, SYSTEM)
    prompt = next(iter(cache.root_node.children.values()))
    cache.inc_lock_ref(prompt)  # the system prompt stays on the GPU
    for doc in DOCS[:n]:
        serve(cache, SYSTEM + HEADER + doc + [7])
        cache.evict(EvictParams(num_tokens=10**6))
    cache.shared.flush()
    print(json.dumps({"published": cache.stats.published, "stores": dict(cache.stats.stores)}), flush=True)
    sys.stdin.read()  # until the test is done reading
    return None


if __name__ == "__main__":
    main()
