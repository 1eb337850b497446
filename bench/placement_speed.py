"""Speed of the placement heuristic: a full re-plan of N contexts (every context starts
on the GPU and most must move; also *cold*, right after a change of the cost model's
rates, when the policy must price every configuration of every context again rather
than only those of contexts that changed), the incremental updates (one hit; one context added and
one removed), and what the server does per eviction (a hit, then a re-plan from the
current placement with one context's worth of GPU room less).

Usage: python bench/placement_speed.py [--out FILE] [--keep-freed-heap BYTES]

Numbers depend on the allocator: at 100k contexts each temporary array is ~10 MB, and
glibc returns freed memory to the OS and page-faults it back on every call unless told
to keep it. The server tells it (setting ``keep_freed_heap_bytes``, see
``evicpress_sglang/heap.py``); so does this script by default, with the same value
(``--keep-freed-heap 0``: glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import timeit

import numpy as np
import torch

from evicpress_sglang.codecs import KVShape
from evicpress_sglang.heap import keep_freed_heap
from evicpress_sglang.policy import ContextTable, CostModel, Weights, build_configs, make_policy
from evicpress_sglang.settings import DEFAULT_DISK_CODECS, DEFAULT_HOST_CODECS, Settings

LAYOUT = KVShape(32, 0, 8, 128, torch.bfloat16)


def build(n: int, seed: int = 0) -> tuple[ContextTable, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = ContextTable(build_configs(list(DEFAULT_HOST_CODECS), list(DEFAULT_DISK_CODECS)), LAYOUT, CostModel())
    codecs = ("fp8", "int8", "int4", "int2")
    quality = np.empty((n, len(codecs)))
    for i in range(n):
        parent = f"c{rng.integers(0, i)}" if i and rng.random() < 0.3 else None
        table.insert(f"c{i}", int(rng.integers(256, 16384)), now=float(rng.uniform(0, 3600)), parent=parent)
        quality[i] = rng.uniform(0.7, 1.0, len(codecs))
    for j, codec in enumerate(codecs):  # as if every context had been profiled
        table.set_qualities(table.rows(), codec, quality[:, j])
    total = table.sizes[table.rows(), table.gpu_config].sum()
    return table, np.array([total * 0.2, total * 0.3, total * 0.4])


def _ms(fn, repeat: int) -> dict:
    """Best and median of ``repeat`` single calls: this is a shared VM, the median says
    what a call usually costs, the best what the code costs without interference."""
    times = np.array(timeit.repeat(fn, number=1, repeat=repeat)) * 1e3
    return {"best_ms": round(float(times.min()), 2), "median_ms": round(float(np.median(times)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--keep-freed-heap", type=int, default=Settings().keep_freed_heap_bytes,
                    help="bytes of freed heap to keep, as the server does (0: glibc defaults); default %(default)s")
    args = ap.parse_args()
    report = {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
              "keep_freed_heap": keep_freed_heap(args.keep_freed_heap),
              "numpy": np.__version__, "cpu": platform.processor() or platform.machine(),
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "rows": []}
    for n in (1_000, 10_000, 100_000):
        table, cap = build(n)
        pol = make_policy("evicpress", table, Weights())
        repeat = 20 if n < 100_000 else 10
        full = _ms(lambda: pol.place(cap, now=3600.0), repeat)  # every context starts on the GPU

        def cold() -> None:  # a re-plan after a calibration changed every context's load time
            table.cost.host_latency = 1e-4 if table.cost.host_latency != 1e-4 else 1.01e-4
            pol.place(cap, now=3600.0)

        full_cold = _ms(cold, repeat)
        rows, assign = pol.place(cap, now=3600.0)
        table.set_assign(rows, assign)
        key = table.keys[rows[0]]
        one = table.sizes[rows[0], table.gpu_config]

        def eviction() -> None:  # what the server does when a request needs one context's room
            table.hit(key, now=3600.0)
            pol.place(cap - np.array([one, 0, 0]), now=3600.0)

        def add_remove() -> None:  # a context newly cached, and one that leaves the tree
            table.insert("new", 4096, now=3600.0, parent=key)
            table.remove("new")

        hit = min(timeit.repeat(lambda: table.hit(key, now=3600.0), number=1000, repeat=5)) / 1000
        add = min(timeit.repeat(add_remove, number=100, repeat=5)) / 100
        row = {"contexts": n, "full_replan": full, "full_replan_cold": full_cold, "hit_us": round(hit * 1e6, 2),
               "add_and_remove_us": round(add * 1e6, 2), "eviction": _ms(eviction, repeat)}
        report["rows"].append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
