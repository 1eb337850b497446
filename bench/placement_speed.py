"""Speed of the placement heuristic: a full re-plan of N contexts, and the incremental
path (one hit + a relieve of the GPU tier) the server takes per eviction.

Usage: python bench/placement_speed.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit

import numpy as np
import torch

from evicpress_sglang.codecs import KVShape
from evicpress_sglang.policy import ContextTable, CostModel, Weights, build_configs, make_policy
from evicpress_sglang.settings import DEFAULT_DISK_CODECS, DEFAULT_HOST_CODECS

LAYOUT = KVShape(32, 0, 8, 128, torch.bfloat16)


def build(n: int, seed: int = 0) -> tuple[ContextTable, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = ContextTable(build_configs(list(DEFAULT_HOST_CODECS), list(DEFAULT_DISK_CODECS)), LAYOUT, CostModel())
    for i in range(n):
        parent = f"c{rng.integers(0, i)}" if i and rng.random() < 0.3 else None
        table.insert(f"c{i}", int(rng.integers(256, 16384)), now=float(rng.uniform(0, 3600)), parent=parent)
        for codec in ("fp8", "int8", "int4", "int2"):
            table.quality[table.row_of[f"c{i}"], [j for j, c in enumerate(table.configs) if c.codec and
                                                   c.codec.split("+")[0] == codec]] = rng.uniform(0.7, 1.0)
    total = table.sizes[table.rows(), table.gpu_config].sum()
    return table, np.array([total * 0.2, total * 0.3, total * 0.4])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    report = {"command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
              "numpy": np.__version__, "cpu": platform.processor() or platform.machine(), "rows": []}
    for n in (1_000, 10_000, 100_000):
        table, cap = build(n)
        pol = make_policy("evicpress", table, Weights())
        full = min(timeit.repeat(lambda: pol.place(cap, now=3600.0), number=1, repeat=5))
        rows, assign = pol.place(cap, now=3600.0)
        table.assign[rows] = assign
        key = table.keys[rows[0]]
        def incremental():
            table.hit(key, now=3600.0)
            pol.place(cap * np.array([0.999, 1, 1]), now=3600.0)  # a little GPU pressure
        inc = min(timeit.repeat(incremental, number=1, repeat=5))
        hit = min(timeit.repeat(lambda: table.hit(key, now=3600.0), number=1000, repeat=5)) / 1000
        row = {"contexts": n, "full_replan_ms": full * 1e3, "hit_us": hit * 1e6, "hit_plus_relieve_ms": inc * 1e3}
        report["rows"].append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
