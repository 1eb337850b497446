"""hot_path.json: one row per (context count, policy), as issue 25 asks, from the runs that
measured them, each row naming its run (``source``).

- evicpress at 10k and 100k contexts: this session's run (``hot_path_run.json``, H200, commit
  of 2026-12-02, ``--contexts 10000,100000 --seconds 30``).
- stock at 1k / 10k / 100k and evicpress at 1k: the session-13 re-run
  (``../2026-12-01-hot-path/rerun/hot_path.json``, H200, 15 s windows): not re-measured here
  (device time). Stock's code is SGLang's and did not change.

Run from this folder: python combine.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
new = json.loads((HERE / "hot_path_run.json").read_text())
old = json.loads((HERE.parent / "2026-12-01-hot-path" / "rerun" / "hot_path.json").read_text())
rows = [r | {"source": "hot_path_run.json"} for r in new["rows"]]
have = {(r["contexts"], r["policy"]) for r in rows}
rows += [r | {"source": "../2026-12-01-hot-path/rerun/hot_path.json"} for r in old["rows"]
         if (r["contexts"], r["policy"]) not in have]
rows.sort(key=lambda r: (r["policy"] != "stock", r["contexts"]))
by = {(r["contexts"], r["policy"]): r for r in rows}
ratios = {str(n): by[(n, "evicpress")]["itl_p99_ms"] / by[(n, "stock")]["itl_p99_ms"]
          for n in sorted({r["contexts"] for r in rows}) if (n, "evicpress") in by and (n, "stock") in by}
out = {"commands": {"this run": new["command"], "session 13": old["commands"]},
       "note": "evict_* percentiles are the upper bounds of the histogram buckets they fall in; rows name their run",
       "rows": rows, "itl_p99_evicpress_over_stock": ratios}
(HERE / "hot_path.json").write_text(json.dumps(out, indent=1))
for r in rows:
    print(f'{r["policy"]:9s} {r["contexts"]:6d}  evict p99 <= {r["evict_p99_ms"]}  itl p99 {r["itl_p99_ms"]:.1f}  '
          f'ttft p99 {r["ttft_p99_ms"]:.1f}  ({r["source"]})')
print(ratios)
