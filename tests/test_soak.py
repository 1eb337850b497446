"""bench/soak.py end to end against the stand-in server: traffic at every concurrency level,
a policy switch per period with JSON replies, the exactness round, and the verdict."""

import json
import subprocess
import sys
from pathlib import Path

FAKE = Path(__file__).with_name("fake_sglang_server.py")
SOAK = Path(__file__).parent.parent / "bench" / "soak.py"


def test_soak_runs_and_judges(tmp_path):
    out = tmp_path / "soak"
    r = subprocess.run([sys.executable, str(SOAK), "--model", "stand-in", "--out", str(out), "--minutes", "0.05",
                        "--switch-s", "0.5", "--docs", "4", "--doc-chars", "600", "--port", "31811",
                        "--launcher", f"{sys.executable} {FAKE}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "soak.json").read_text())
    assert result["passed"] and result["traffic"]["served"] > 0 and not result["traffic"]["errors"]
    switches = result["traffic"]["switches"]
    assert [s["policy"] for s in switches[:3]] == ["evicpress", "static:int2", "static:keydiff:0.3+int8"]
    assert {s["concurrency"] for s in switches[:-1]} <= {1, 4, 16, 8, 2} and all(s["json"] for s in switches)
    assert switches[-1]["policy"] == "lru-offload"  # the exactness round runs lossless
    facts = result["facts"]
    assert len(facts) == 8 and {f["round"] for f in facts} == {0, 1}
    assert all(f["answer"] == f["reference"] for f in facts)  # the stand-in answers as a function of the prompt
    assert result["checks"]["leak_messages"] == 0 and result["checks"]["alive_at_end"]
