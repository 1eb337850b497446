"""A second process for the remote-tier tests: a fresh MooncakeTier that stores or loads a
context, or watches its store go away. Talks to the test over stdin/stdout (one JSON line
per report), so the test can keep it alive while another process reads what it stored (its
segment may hold the object) and kill it when done.

    python tests/remote_worker.py put|get|outage CONFIG_JSON [KEY CODEC SEED]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch

from evicpress_sglang.codecs import EncodedKV, get_codec
from evicpress_sglang.tiers import TierError
from evicpress_sglang.tiers.remote import make_remote_tier


def sample_encoded(codec: str, seed: int) -> EncodedKV:
    """KV of a small context ([layers, tokens, heads, head_dim], bf16) encoded with ``codec`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 70, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    return get_codec(codec).encode(k, v)


def fingerprint(enc: EncodedKV) -> dict:
    return {"codec": enc.codec, "shape": list(enc.shape.tensor_shape), "dtype": str(enc.shape.dtype),
            "sha256": hashlib.sha256(enc.payload.numpy().tobytes()).hexdigest()}


def _report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _timed(fn, *args) -> tuple[object, float]:
    start = time.monotonic()
    try:
        result = fn(*args)
    except TierError as e:
        result = f"TierError: {e}"
    return result, time.monotonic() - start


def main(mode: str, config: dict, *args: str) -> None:
    tier = make_remote_tier(config)
    if mode == "put":
        key, codec, seed = args
        tier.put(key, sample_encoded(codec, int(seed)))
        tier.flush()
        _report(stored=tier.usage().counters["failed_writes"] == 0)
        sys.stdin.readline()  # stay (and keep our segment in the store) until the test is done
    elif mode == "get":
        enc = tier.get(args[0])
        _report(found=enc is not None, **(fingerprint(enc) if enc is not None else {}))
    elif mode == "outage":
        tier.put("k", sample_encoded("int8", 0))
        tier.flush()
        _report(ready=tier.get("k") is not None)
        sys.stdin.readline()  # the test kills the master here
        ops = {"contains": (tier.contains, "k"), "get": (tier.get, "k"), "contains again": (tier.contains, "k"),
               "put": (tier.put, "k2", sample_encoded("int8", 1))}
        seconds = {}
        for name, (fn, *fn_args) in ops.items():
            result, seconds[name] = _timed(fn, *fn_args)
            seconds[name + " result"] = str(result)
        time.sleep(tier.options.backoff_s)  # the next call probes the store again
        result, seconds["probe"] = _timed(tier.contains, "k")
        seconds["probe result"] = str(result)
        _report(seconds=seconds, counters=tier.usage().counters)
        sys.stdin.readline()  # the test kills us: leaving a dead store takes Mooncake minutes of retries
        return
    tier.close()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:])
