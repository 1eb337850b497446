"""Answer F1 against full KV over four draws of the docqa workload (seeds 0-3), per policy, with the
per-request paired difference of keydiff:0.5 and expected:0.5 over all draws (issue 24).

Each run scores its policies against its own ``reference`` (the same server with nothing dropped),
as the bench's report does. Run from the repository root:
    python bench/results/2026-12-02-selector-seeds/seeds_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evicpress_sglang.profiler.scores import token_f1

HERE = Path(__file__).parent
RUNS = {  # seed -> {policy file stem: run directory}
    0: {"static_keydiff_0.3": HERE / "../2026-12-02-selectors",
        "static_keydiff_0.5": HERE / "../2026-12-02-selector-serving/sel",
        "static_expected_0.5": HERE / "../2026-12-02-selector-serving/sel"},
    1: {"static_keydiff_0.5": HERE / "../2026-12-02-selector-serving/sel_seed1",
        "static_expected_0.5": HERE / "../2026-12-02-selector-serving/sel_seed1"},
    2: {p: HERE / "sel_seed2" for p in ("static_keydiff_0.3", "static_keydiff_0.5", "static_expected_0.5")},
    3: {p: HERE / "sel_seed3" for p in ("static_keydiff_0.3", "static_keydiff_0.5", "static_expected_0.5")},
}
POLICIES = ("static_keydiff_0.3", "static_keydiff_0.5", "static_expected_0.5")


def f1_per_request(run: Path, policy: str) -> dict[int, float]:
    ref = {r["id"]: r["text"] for r in json.loads((run / "reference.json").read_text())["results"]}
    rows = json.loads((run / f"{policy}.json").read_text())["results"]
    return {r["id"]: token_f1(r["text"], ref[r["id"]]) for r in rows if r.get("text") is not None and r["id"] in ref}


def main() -> None:
    f1 = {(seed, p): f1_per_request(run, p) for seed, runs in RUNS.items() for p, run in runs.items()}
    print(f"{'policy':22s} " + " ".join(f"seed {s}" for s in RUNS) + "  mean of seeds")
    for p in POLICIES:
        per_seed = [np.mean(list(f1[(s, p)].values())) if (s, p) in f1 else None for s in RUNS]
        cells = " ".join(f"{v:6.3f}" if v is not None else "     -" for v in per_seed)
        got = [v for v in per_seed if v is not None]
        print(f"{p:22s} {cells}  {np.mean(got):.3f} (n={len(got)})")
    diffs = []
    for s in RUNS:
        a, b = f1[(s, "static_keydiff_0.5")], f1[(s, "static_expected_0.5")]
        diffs += [a[i] - b[i] for i in a.keys() & b.keys()]
    d = np.array(diffs)
    print(f"keydiff:0.5 - expected:0.5, per request over all seeds: {d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(d.size):.3f} "
          f"(n={d.size})")
    for s in (2, 3):  # keydiff:0.3 against the better selector at 0.5, where both ran
        a = f1[(s, "static_keydiff_0.3")]
        best = max(("static_keydiff_0.5", "static_expected_0.5"), key=lambda p: np.mean(list(f1[(s, p)].values())))
        b = f1[(s, best)]
        d = np.array([a[i] - b[i] for i in a.keys() & b.keys()])
        print(f"seed {s}: keydiff:0.3 - {best}: {d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(d.size):.3f}")


if __name__ == "__main__":
    main()
