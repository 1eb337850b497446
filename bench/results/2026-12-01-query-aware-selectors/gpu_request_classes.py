"""Section 2 of answer_agreement_study.md: the GPU run's answer F1 vs full KV by request class
(new document / new question on a seen document / same prompt as an earlier request) and the
F1 lost per document, from the per-request answers in gpu-run1/ and gpu-run2/ (no GPU needed).

    PYTHONPATH=/work/wt-selectors python gpu_request_classes.py [--root DIR]
"""
import argparse, collections, json
from pathlib import Path

import numpy as np

from evicpress_sglang.bench.workload import docqa
from evicpress_sglang.profiler.scores import token_f1

ap = argparse.ArgumentParser()
ap.add_argument("--root", default=str(Path(__file__).parent))
root = Path(ap.parse_args().root)
reqs = docqa(n_requests=90, docs=30, rate=6.0, min_chars=6000, max_chars=20000, seed=0)
ref = {x["id"]: x for x in json.load(open(root / "gpu-run2/reference.json"))["results"]}
runs = {"keydiff": "gpu-run2/static_keydiff_0.5.json", "expected": "gpu-run2/static_expected_0.5.json",
        "kvzip": "gpu-run1/static_kvzip_0.5.json", "knorm": "gpu-run1/static_knorm_0.5.json",
        "streaming": "gpu-run1/static_streaming_0.5.json"}
seen, seen_doc, kind = set(), set(), {}
for r in reqs:
    kind[r.id] = "same prompt" if r.prompt in seen else ("seen doc" if r.context in seen_doc else "new doc")
    seen.add(r.prompt), seen_doc.add(r.context)
lost = collections.defaultdict(lambda: collections.defaultdict(float))
for name, f in runs.items():
    res = {x["id"]: x for x in json.load(open(root / f))["results"]}
    cls = collections.defaultdict(list)
    for r in reqs:
        x = res[r.id]
        f1 = token_f1(x["text"], ref[r.id]["text"])
        lost[r.context][name] += 1 - f1
        cls[kind[r.id] + (", hit" if x["cached_tokens"] > x["prompt_tokens"] / 2 else ", miss")].append(f1)
    print(f"{name:10s}", {c: (len(v), round(float(np.mean(v)), 3)) for c, v in sorted(cls.items())})
print("F1 lost per document:", *runs)
for doc, per in sorted(lost.items(), key=lambda kv: -sum(kv[1].values())):
    if sum(per.values()):
        print(f"{doc:6s}", " ".join(f"{per[n]:6.2f}" for n in runs))
