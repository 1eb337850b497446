"""Answer F1 against the reference split by question kind (planted fact / open), from committed
bench runs; regenerates each run's docqa workload from its seed (the bench does not store it).
The bench's report gives the same split since this run ("F1 facts / other")."""

import json
from pathlib import Path

import numpy as np

from evicpress_sglang.bench.workload import build
from evicpress_sglang.profiler.scores import token_f1

HERE = Path(__file__).parent
RUNS = [(HERE / "sel", 0), (HERE / "sel_seed1", 1), (HERE.parent / "2026-12-02-selectors", 0),
        (HERE.parent / "2026-12-02-selector-oracles" / "sel", 0)]

for run, seed in RUNS:
    reqs = build("docqa", seed=seed, n_requests=90, docs=30, rate=6, min_chars=6000, max_chars=20000)
    ref = {r["id"]: r["text"] for r in json.loads((run / "reference.json").read_text())["results"]}
    for path in sorted(run.glob("static_*.json")):
        by = {"fact": [], "open": []}
        for r in json.loads(path.read_text())["results"]:
            by["fact" if reqs[r["id"]].truth else "open"].append(token_f1(r["text"], ref[r["id"]]))
        cells = "  ".join(f"{k} {np.mean(v):.3f} (n={len(v)})" for k, v in by.items())
        print(f"{run.relative_to(HERE.parent)!s:45s} {path.stem:22s} {cells}")
