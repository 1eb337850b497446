"""The figures bench/profiler_pressure.py prints at its end, for the runs saved in this folder.

The GPU session ran out of device time during the second run (``profile_share`` 0), so the
bench never wrote its summary; this recomputes it from the saved run(s) with the bench's own
code (``run_summary``, the same workload rebuilt from the same arguments) and writes
``summary.json``. Run from the repository root:
python bench/results/2026-12-02-profiler-pressure/summary_of_saved_runs.py
"""

import json
import shlex
from pathlib import Path

from evicpress_sglang.bench import profiler_pressure as pp
from evicpress_sglang.bench import runner

HERE = Path(__file__).resolve().parent
command = (HERE / "command.txt").read_text().split("python3 ", 1)[1].split(" ", 1)[1]
args = pp.build_parser().parse_args(shlex.split(command))
reqs = runner.workload_of(pp.bench_args(args))
runs = {}
for spec in pp.RUNS:
    saved = HERE / f"{runner.slug(spec)}.json"
    if saved.exists():
        runs[spec] = pp.run_summary(json.loads(saved.read_text()), reqs)
out = {"command": (HERE / "command.txt").read_text().strip(), "runs": runs, **pp.compare(runs)}
(HERE / "summary.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
