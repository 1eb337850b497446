"""Distinct context tokens of the run as SGLang counted them, against the GPU pool: per document,
the longest prompt stock's server reported (``prompt_tokens``) at 4 req/s; the sum over documents.

Usage: python bench/results/2026-12-02-short-host-8b/context_tokens.py  (prints one JSON line)
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "ttft-8b-dummy" / "rate-4"
workload = json.loads((HERE / "workload.json").read_text())
context = {r["id"]: r["context"] for r in workload["requests_run"]}
longest: dict[str, int] = {}
for r in json.loads((HERE / "stock.json").read_text())["results"]:
    longest[context[r["id"]]] = max(longest.get(context[r["id"]], 0), r["prompt_tokens"] or 0)
total = sum(longest.values())
print(json.dumps({"documents": len(longest), "context_tokens": total, "pool_tokens": workload["pool_tokens"],
                  "times_the_pool": round(total / workload["pool_tokens"], 2)}))
