"""One tensor-parallel rank for tests/test_tensor_parallel.py (run as a process of its own).

``python tp_worker.py RANK PORT TMP OUT STEPS SYNC``: joins a 2-rank gloo group over
127.0.0.1, builds a cache over its own real SGLang pool (one KV head: its shard) with
``tp_cache_group`` set to that group, and serves the same seeded request stream as the
other rank. What differs per rank is what differs in production: rank 1's clock runs with
a large offset and a jittered rate, it has learnt another prefill rate and calibrated
other bandwidths, and its disk writes fail (ENOSPC) for a stretch of steps. The policy is
switched mid-stream on both ranks, as SGLang's scheduler delivers an admin change to
every rank. After every step the ranks gather a digest of their state (tree, placements,
frequencies, loaded lengths, pool usage) and stop at the first difference. ``SYNC=0``
switches agreement off: what the code did before ranks agreed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import threading
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402

import harness  # noqa: E402
try:
    from evicpress_sglang.backend import tp_sync  # noqa: E402
except ImportError:  # the code before ranks agreed (EVICPRESS_TP_CODE in the test)
    tp_sync = None
from evicpress_sglang.backend.cache import EvicPressRadixCache  # noqa: E402
from evicpress_sglang.backend.nodes import is_placeholder  # noqa: E402
from evicpress_sglang.policy import CostModel  # noqa: E402
from evicpress_sglang.settings import Settings  # noqa: E402
from evicpress_sglang.tiers import disk as disk_module  # noqa: E402

SEED = 22
FAIL_WRITES = range(30, 70)  # steps during which rank 1's disk writes fail
POLICY_AT = {50: "static:int4", 90: "lru-offload", 120: "evicpress"}
PROFILE_AT = 15  # at every step % 20 == 15, a profile job runs between two user requests


def skew_clock(rng: random.Random) -> None:
    """Rank 1's clock: a large offset and a jittered rate (still monotonic, as clocks are)."""
    real, lock = time.monotonic, threading.Lock()
    state = {"t": real() + rng.uniform(1e5, 1e7), "last": real()}

    def monotonic() -> float:
        with lock:
            now = real()
            state["t"] += (now - state["last"]) * rng.uniform(0.1, 20.0)
            state["last"] = now
            return state["t"]

    time.monotonic = monotonic


class FailingDisk:
    """Rank 1's disk: writes fail with ENOSPC while ``failing``, and lag a little always."""

    def __init__(self, rng: random.Random) -> None:
        self.failing = False
        self.rng = rng
        self.refused = 0

    def open(self, path, mode="r", *args, **kwargs):
        if "w" in mode:
            time.sleep(self.rng.uniform(0, 0.004))
            if self.failing:
                self.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)


def requests(n: int) -> list[list[int]]:
    """The shared request stream: system prompts, documents reused with new questions."""
    rng = random.Random(SEED)
    systems = [list(range(50_000 + 100 * s, 50_000 + 100 * s + 24)) for s in range(2)]
    docs = [list(range(1000 * d, 1000 * d + rng.randrange(40, 110))) for d in range(14)]
    out = []
    for _ in range(n):
        d = min(int(rng.paretovariate(1.2)) - 1, len(docs) - 1)
        out.append(systems[d % 2] + docs[d] + [rng.randrange(90_000, 91_000) for _ in range(rng.randrange(1, 8))])
    return out


def digest(cache: EvicPressRadixCache, served: harness.Served) -> list:
    """Everything that must be equal on every rank after a step, in a fixed order."""
    t = cache.table
    nodes = []
    stack = [(cache.root_node, "")]
    while stack:
        node, path = stack.pop()
        for key in sorted(node.children, key=repr):
            child = node.children[key]
            here = f"{path}/{child.key.extra_key}:{list(child.key.token_ids)[:1]}+{len(child.key)}"
            row = t.row_of.get(child.id)
            nodes.append((here, child.id, is_placeholder(child), None if child.value is None else len(child.value),
                          child.lock_ref, None if row is None else t.configs[t.assign[row]].label,
                          None if row is None else (repr(float(t.freq[row])), repr(float(t.last_time[row])))))
            stack.append((child, here))
    alloc = cache.token_to_kv_pool_allocator
    return [("served", served.reused, served.loaded),
            ("pool", alloc.available_size(), cache.evictable_size_, cache.protected_size_),
            ("policy", cache.settings.policy, cache.health.degraded), *nodes,
            ("calibration", repr(cache.cost.host_bw), repr(cache.cost.disk_bw))]


def profile_job(cache: EvicPressRadixCache, recompute: bool) -> tuple[int, int]:
    """One background profile job, its requests in the runner's order (the reference, then
    each codec), then its report: staging a copy in the full pool evicts inside a match, on
    every rank alike. ``recompute``: everything leaves the GPU first, so the job prefills its
    reference. Returns the variants measured and whether the job recomputed."""
    if recompute:
        cache.evict(EvictParams(num_tokens=cache.token_to_kv_pool_allocator.size))
    before = set(cache.profiling.jobs)
    cache.profiling.prepare(1, idle=dist.get_rank() == 0)  # rank 1 has a request waiting: no rank makes one
    if set(cache.profiling.jobs) != before:
        raise AssertionError("a job was made while a rank was not idle")
    cache.profiling.prepare(1)
    new = [j for i, j in cache.profiling.jobs.items() if i not in before]
    if not new:
        return 0, 0
    job = new[0]
    for v in range(len(job.codecs)):
        harness.serve(cache, job.prefix + [95_000 + v], extra_key=f"evp-profile:{job.id}:{v}")
    out = cache.profiling.report(job.id, {v: 0.5 for v in range(1, len(job.codecs))}, 1)
    return len(out["measured"]), int(job.recompute)


def held_for_remote_reads(cache: EvicPressRadixCache, rank: int) -> list:
    """Each rank has a remote read still running for a different request (rank 0 for "a",
    rank 1 for "b"): both must hold both out of prefill, then neither once the reads are
    done. (A stand-in remote tier: only whether one is configured matters here.)"""
    go = threading.Event()

    def read():
        go.wait(30)
        return None, 0

    cache.shared = types.SimpleNamespace()
    try:
        cache.prefetch.start(f"read-{rank}", read, rid="ab"[rank], deadline=time.monotonic() + 60)
        while_running = sorted(cache.held_for_prefetch(["a", "b", "c"]))
        go.set()
        while cache.prefetch.known(f"read-{rank}") and not cache.prefetch.result(f"read-{rank}")[0]:
            time.sleep(0.001)
        return [while_running, sorted(cache.held_for_prefetch(["a", "b", "c"]))]
    finally:
        cache.shared = None


def first_difference(a: list, b: list) -> str | None:
    for x, y in zip(a, b):
        if x != y:
            return f"rank 0: {x!r} / rank 1: {y!r}"
    return None if len(a) == len(b) else f"{len(a)} vs {len(b)} entries"


def main(rank: int, port: int, tmp: str, out: str, steps: int, sync: bool) -> None:
    if not sync and tp_sync is not None:
        tp_sync.RankSync.on = property(lambda self: False)  # as before ranks agreed
    rng = random.Random(1000 + rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    harness.HEADS = 1  # each rank holds its shard: one of the model's two KV heads
    params = harness.make_params(360)
    params.tp_cache_group = dist.group.WORLD
    disk = FailingDisk(rng)
    cost = CostModel()
    if rank == 1:
        skew_clock(rng)
        disk_module.open = disk.open
        cost.host_bw *= 0.3  # its own start-up calibration
        cost.disk_bw *= 4.0
    token_bytes = 2 * harness.LAYERS * 1 * harness.DIM * 2
    settings = Settings(host_bytes=90 * token_bytes, disk_dir=os.path.join(tmp, f"rank{rank}"), disk_bytes=10**8,
                        host_codecs=["bf16", "int8", "int4"], disk_codecs=["bf16+zstd", "int4+zstd"],
                        half_life_s=0.02, profile_min_tokens=32, profile_reserve=0.5)
    cache = EvicPressRadixCache(params, settings, cost=cost)
    if rank == 1:  # its own profiler GPU time: its share is spent, rank 0's is not (rank 0 decides)
        cache.profile_budget.charge(1e9)
    result = {"steps": 0, "divergence": None, "internal_errors": 0, "loaded": 0, "profiled": 0, "recomputed": 0}
    for step, tokens in enumerate(requests(steps)):
        if step in POLICY_AT:
            cache.set_policy(POLICY_AT[step])
        disk.failing = step in FAIL_WRITES
        if rank == 1:  # its own prefill timings
            cache.cost.prefill_s_per_token = 27e-6 * rng.uniform(0.05, 20.0)
        if step % 20 == PROFILE_AT:
            measured, recomputed = profile_job(cache, recompute=(step // 20) % 2 == 1)
            result["profiled"] += measured
            result["recomputed"] += recomputed
        served = harness.serve(cache, tokens, load_back=step % 7 != 3)
        result["loaded"] += served.loaded
        both: list = [None, None]
        dist.all_gather_object(both, digest(cache, served))
        result["steps"] = step + 1
        diff = first_difference(*both)
        if diff is not None:
            result["divergence"] = f"step {step}: {diff}"
            break
    if sync:
        result["held"] = held_for_remote_reads(cache, rank)
    result["internal_errors"] = cache.health.internal_errors
    result["degraded"] = cache.health.degraded
    result["refused_writes"] = disk.refused
    result["disk_misses"] = cache.stats.misses["disk"]
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1")
