"""Where an eviction's time goes with the background planner at 100k contexts (issue 25):
the wait for the cache's lock (the planner's snapshot holds it) against the rest, timed
around ``_evict_with`` so that the same loop runs on the code before and after the
O(changed rows) snapshot refresh. Same loop as ``bench/hot_path.py cpu`` (4-token contexts,
16-slot evictions), an eviction every GAP_MS.

    python lock_wait_probe.py 100000 5 OUT.json
    PYTHONPATH=/tmp/before python lock_wait_probe.py 100000 5 OUT.json   # the code before
"""
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

import evicpress_sglang

# the hot-path bench of the checkout being measured (its cache set-up and arrivals)
bench = Path(evicpress_sglang.__file__).resolve().parents[1] / "bench" / "hot_path.py"
spec = importlib.util.spec_from_file_location("hot_path", bench)
hp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hp)

n, gap_ms = int(sys.argv[1]), float(sys.argv[2])
cache = hp._cache(n, True, 1.0)
for i in range(n):
    hp._arrive(cache, i)
waits, total = [], []
inner = type(cache)._evict_with


def timed(self, num_tokens, *args, **kwargs):
    if "called_at" in kwargs:
        waits.append(time.perf_counter() - kwargs["called_at"])
    return inner(self, num_tokens, *args, **kwargs)


type(cache)._evict_with = timed
for j in range(305):
    t0 = time.perf_counter()
    cache.evict(EvictParams(num_tokens=hp.EVICT))
    total.append(time.perf_counter() - t0)
    for k in range(hp.EVICT // hp.TOKENS):
        hp._arrive(cache, n + j * hp.EVICT // hp.TOKENS + k)
    time.sleep(gap_ms / 1e3)
out = {"command": " ".join(["python"] + sys.argv), "contexts": n, "gap_ms": gap_ms, "plan": dict(cache.stats.plan)}
for name, v in (("evict", total), ("lock_wait", waits)):
    t = np.array(v[5:]) * 1e3
    out[name] = {"p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3),
                 "max_ms": round(float(t.max()), 3)}
print(json.dumps(out), flush=True)
if len(sys.argv) > 3:
    Path(sys.argv[3]).write_text(json.dumps(out, indent=1))
