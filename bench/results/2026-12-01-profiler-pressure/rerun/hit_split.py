"""User TTFT with and without the profiler: mean and p99 (the sorted value at index int(0.99 n)),
and p50 split by how much of each prompt came from cache.

Usage (from the repository root): python bench/results/2026-12-01-profiler-pressure/rerun/hit_split.py
Reads the two runs' per-request records in this folder, writes hit_split.json beside them.
"""
import json
import statistics as st
from pathlib import Path

HERE = Path(__file__).resolve().parent
out = {}
for name in ("evicpress", "evicpress_profile_share_0"):
    rs = [r for r in json.loads((HERE / f"{name}.json").read_text())["results"] if "ttft_s" in r]
    share = [r["cached_tokens"] / r["prompt_tokens"] for r in rs]
    hits = [r["ttft_s"] for r, c in zip(rs, share) if c > 0.9]
    misses = [r["ttft_s"] for r, c in zip(rs, share) if c < 0.1]
    ttft = sorted(r["ttft_s"] for r in rs)
    out[name] = {"requests": len(rs), "ttft_mean_ms": round(st.mean(ttft) * 1e3, 1),
                 "ttft_p99_ms": round(ttft[int(0.99 * len(ttft))] * 1e3, 1), "cached_share_mean": round(st.mean(share), 3),
                 "over_90pct_cached": len(hits), "under_10pct_cached": len(misses),
                 "ttft_p50_ms_over_90pct_cached": round(st.median(hits) * 1e3, 1),
                 "ttft_p50_ms_under_10pct_cached": round(st.median(misses) * 1e3, 1)}
(HERE / "hit_split.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
