"""How long the planner's snapshot refresh holds the cache's lock, by table size (issue 25).

A ContextTable of N contexts (SmolLM2's KV layout, bf16 + int8 configurations); before each
refresh, 50 contexts are hit (what a few requests change between two plans); the median and
best of 30 refreshes are printed. Runs against whichever evicpress_sglang is on the path, so
the code before the O(changed rows) refresh can be measured with the same loop:

    python snapshot_refresh.py                                  # this checkout
    git worktree add /tmp/before 6fc52da && PYTHONPATH=/tmp/before python snapshot_refresh.py
"""
import json
import sys
import time

import numpy as np
import torch

from evicpress_sglang.codecs import KVShape
from evicpress_sglang.policy import ContextTable, CostModel, build_configs

table = ContextTable(build_configs(["bf16", "int8"], []), KVShape(30, 0, 3, 64, torch.bfloat16), CostModel())
rows = []
for n in (10_000, 100_000, 150_000):
    while len(table) < n:
        table.insert(len(table), 9, 0.0)
    snap = table.snapshot()
    times = []
    for k in range(30):
        for j in range(50):
            table.hit((k * 50 + j) * 7 % n, float(k + 1))
        t0 = time.perf_counter()
        snap = table.snapshot(snap)
        times.append(time.perf_counter() - t0)
    t = np.array(times) * 1e3
    rows.append({"contexts": n, "allocated_rows": int(table.alive.size), "median_ms": round(float(np.median(t)), 3),
                 "best_ms": round(float(t.min()), 3)})
    print(json.dumps(rows[-1]), flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump({"command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=1)
