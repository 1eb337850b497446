"""Per question kind (planted fact / open) F1 of the CPU harness runs cpu_*_stored.json, as
question_types.py splits the bench runs."""

import json
from pathlib import Path

import numpy as np

from evicpress_sglang.profiler.scores import token_f1

HERE = Path(__file__).parent
for name in ("cpu_mix_stored", "cpu_mix2_stored", "cpu_perhead_stored", "cpu_question_stored"):
    data = json.loads((HERE / f"{name}.json").read_text())
    ref = data["reference"]
    for run in data["runs"]:
        by = {"fact": [], "open": []}
        for q, answer in zip(ref, run["answers"]):
            by["fact" if q["truth"] else "open"].append(token_f1(answer["answer"], q["answer"]))
        cells = "  ".join(f"{k} {np.mean(v):.3f} (n={len(v)})" for k, v in by.items())
        print(f"{run['selector']:42s} F1 {run['f1']:.3f}  {cells}  code tokens kept {run['code_tokens_kept']:.2f}"
              f"  fact acc. {run['fact_acc']:.2f}")
