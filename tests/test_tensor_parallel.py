"""Two tensor-parallel ranks (processes, gloo over 127.0.0.1), each a cache over its own
shard of a real SGLang pool, fed the same requests with different clocks, learnt rates,
calibration, profiler budgets and one rank's disk writes failing, a policy switch mid-stream and profile jobs
staging copies in the full pool: their trees, placements, frequencies, loaded lengths and
pool usage stay equal after every step (tests/tp_worker.py). Without agreement they diverge: the test is not vacuous."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("tp_worker.py")
STEPS = 160


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, sync: bool) -> list[dict]:
    port = _free_port()
    root = os.environ.get("EVICPRESS_TP_CODE", str(WORKER.parents[1]))  # the package under test
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(port), str(tmp_path), str(outs[r]),
                               str(STEPS), "1" if sync else "0"], env=env) for r in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], codes
    return [json.loads(o.read_text()) for o in outs]


def test_ranks_make_identical_decisions(tmp_path):
    r0, r1 = _run_ranks(tmp_path, sync=True)
    assert r0["divergence"] is None, r0["divergence"]
    assert r0["steps"] == r1["steps"] == STEPS
    assert r0["internal_errors"] == r1["internal_errors"] == 0
    assert r0["degraded"] is None and r1["degraded"] is None
    assert r1["refused_writes"] > 0  # rank 1's disk did fail, and both ranks dropped those contexts alike
    assert r0["disk_misses"] == r1["disk_misses"] > 0
    assert r0["loaded"] == r1["loaded"] > 0
    assert r0["profiled"] == r1["profiled"] > 0  # profile copies staged (evicting inside a match) alike
    assert r0["recomputed"] == r1["recomputed"] > 0  # references recomputed (prefilled, then pinned) alike
    assert r0["held"] == r1["held"] == [["a", "b"], []]  # each rank's pending remote read holds on both


def test_without_agreement_ranks_diverge(tmp_path):
    r0, _ = _run_ranks(tmp_path, sync=False)
    assert r0["divergence"] is not None
    assert "calibration" not in r0["divergence"], r0["divergence"]  # the trees themselves differ
