"""Is the 100k-context evict() tail the planner thread's GIL? (CPU probe, issue 25.)

The real EvicPressRadixCache over SGLang's CPU pools, 100k contexts of 4 tokens (the CPU hot-path
bench's set-up), then evictions of 16 slots every 5 ms. Each eviction is timed, and marked by whether
the background planner was inside a plan while it ran. With --stand-in, the planner thread makes one
real plan and then, for each later plan, sleeps as long as a plan takes (about 12 ms here) without
holding the GIL, and republishes the first plan: the same timing, no Python or numpy work. At an
eviction every 5 ms the planner is planning all the time, so the two runs differ in whether a thread
that needs the GIL runs beside the evictions. Evictions that applied a plan step (a store: encode
and put) are reported apart from those that only dropped (the LRU fallback), the same work in both.

Usage: python gil_probe.py [--stand-in] [--evictions 400]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import numpy as np  # noqa: E402
from hot_path import EVICT, TOKENS, _arrive, _cache  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--stand-in", action="store_true")
ap.add_argument("--evictions", type=int, default=400)
ap.add_argument("--contexts", type=int, default=100_000)
args = ap.parse_args()

cache = _cache(args.contexts, True, 1.0)
for i in range(args.contexts):
    _arrive(cache, i)
planner = cache.planner
real = planner.plan_once
if args.stand_in:
    real()
    first = planner.plan

    def plan_once():
        time.sleep(0.012)
        planner.plan = first
        return True

    planner.plan_once = plan_once

times, stepped = [], []
for j in range(20 + args.evictions):
    steps = cache.stats.plan["steps"]
    t0 = time.perf_counter()
    cache.evict(EvictParams(num_tokens=EVICT))
    dt = time.perf_counter() - t0
    if j >= 20:
        times.append(dt * 1e3)
        stepped.append(cache.stats.plan["steps"] > steps)
    for k in range(EVICT // TOKENS):
        _arrive(cache, args.contexts + j * EVICT // TOKENS + k)
    time.sleep(0.005)
t, o = np.array(times), np.array(stepped)


def pct(x):
    return {"n": int(x.size), "p50": round(float(np.percentile(x, 50)), 3) if x.size else None,
            "p99": round(float(np.percentile(x, 99)), 3) if x.size else None,
            "max": round(float(x.max()), 3) if x.size else None}


print(json.dumps({"stand_in": args.stand_in, "all": pct(t), "with_plan_steps": pct(t[o]), "drops_only": pct(t[~o]),
                  "plans": planner.plans, "plan": dict(cache.stats.plan)}))
