"""End-to-end proof on a GPU: SGLang serving with ``--radix-cache-backend evicpress``.

Starts the server on the bundled SmolLM2 with a KV pool too small for the documents it
is asked about, so contexts overflow to host memory and disk; asks every document a
question, then asks again (the prefix now comes back from host/disk), compares the
answers, switches the policy live through the admin endpoint, and checks that a bad
admin request is refused. Writes everything it saw to ``--out``.

Usage: python bench/gpu_smoke.py --model DIR --out DIR [--port 30123] [-- extra sglang args]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

from evicpress_sglang.bench.server import Server
from evicpress_sglang.sample_text import documents

QUESTION = "\n\nQuestion: In one sentence, what is the text above about?\nAnswer:"


def ask(url: str, text: str) -> dict:
    t0 = time.perf_counter()
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 32},
                                               "return_logprob": True, "top_logprobs_num": 2}, timeout=120)
    r.raise_for_status()
    out = r.json()
    meta = out["meta_info"]
    # Top-2 log-probabilities of each generated token: a greedy flip between two runs is only a
    # numerics question when the two candidates were nearly tied where the answers part.
    top2 = [[round(lp, 4) for lp, _tok, _txt in step[:2]] for step in meta.get("output_top_logprobs") or []]
    return {"latency_s": time.perf_counter() - t0, "answer": out["text"],
            "prompt_tokens": meta["prompt_tokens"], "cached_tokens": meta.get("cached_tokens"),
            "output_ids": [tok for _lp, tok, _txt in meta.get("output_token_logprobs") or []], "top2_logprobs": top2}


def divergence(a: dict, b: dict) -> dict | None:
    """Where two greedy answers part: the step, and each run's top-2 log-probability gap there."""
    for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])):
        if x != y:
            gap = [round(t[i][0] - t[i][1], 4) if len(t) > i and len(t[i]) == 2 else None
                   for t in (a["top2_logprobs"], b["top2_logprobs"])]
            return {"step": i, "top2_gap": gap}
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--chars", type=int, default=5000, help="characters per document (~1200 tokens)")
    ap.add_argument("--max-total-tokens", type=int, default=4096)
    ap.add_argument("--settings", default="{}", help="JSON merged into the EVICPRESS settings below")
    ap.add_argument("sglang_args", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    disk = Path("/tmp/evicpress-smoke-disk")
    per_token = 30 * 3 * 64 * 2 * 2  # SmolLM2-135M: layers x kv_heads x head_dim x (K, V) x bf16
    settings = {"policy": "evicpress", "host_bytes": 1500 * per_token, "disk_dir": str(disk),
                "disk_bytes": 200 * 2**20} | json.loads(args.settings)
    env = dict(os.environ, EVICPRESS_CONFIG=json.dumps(settings))
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model, "--port", str(args.port),
           "--radix-cache-backend", "evicpress", "--max-total-tokens", str(args.max_total_tokens),
           "--chunked-prefill-size", "2048", "--enable-metrics", *args.sglang_args]
    log = out / "server.log"
    url = f"http://127.0.0.1:{args.port}"
    report = {"command": " ".join(["python", *sys.argv]), "server_command": " ".join(cmd), "settings": settings}
    with Server(cmd, env, log, args.port, timeout=300):  # stopped (process group) on the way out
        docs = [text[: args.chars] for _, text in documents()[: args.docs]]
        # Each document asked twice in a row: the second is a plain GPU-pool hit, the control
        # for how often SGLang's cached-prefix path alone changes a greedy answer.
        first, control = [], []
        for d in docs:  # fills the pool, overflows into host and disk
            first.append(ask(url, d + QUESTION))
            control.append(ask(url, d + QUESTION))
        report["status_after_first_pass"] = requests.get(url + "/evicpress/status").json()
        again = [ask(url, d + QUESTION) for d in docs]  # prefixes come back from host/disk
        report["status_after_second_pass"] = requests.get(url + "/evicpress/status").json()
        report["requests"] = [{"doc": i, "first": a, "gpu_hit": c, "again": b,
                               "gpu_hit_same_answer": a["answer"] == c["answer"],
                               "same_answer": a["answer"] == b["answer"]}
                              for i, (a, c, b) in enumerate(zip(first, control, again))]
        bad = requests.post(url + "/evicpress/policy", data="{nope", headers={"content-type": "application/json"})
        report["bad_request"] = {"status": bad.status_code, "body": bad.json()}
        sw = requests.post(url + "/evicpress/policy", json={"policy": "static:int4", "alpha": 1.0})
        report["switch"] = {"status": sw.status_code, "policy": sw.json().get("policy"),
                            "weights": sw.json().get("weights")}
        third = [ask(url, f"Item {i}. " + d + QUESTION) for i, d in enumerate(docs)]  # new contexts under static:int4
        fourth = [ask(url, f"Item {i}. " + d + QUESTION) for i, d in enumerate(docs)]
        report["after_switch"] = [{"first": a, "again": b, "same_answer": a["answer"] == b["answer"]}
                                  for a, b in zip(third, fourth)]
        report["status_final"] = requests.get(url + "/evicpress/status").json()
        metrics = requests.get(url + "/metrics").text.splitlines()
        report["prometheus"] = [line for line in metrics if line.startswith("evicpress_")]
    (out / "smoke.json").write_text(json.dumps(report, indent=1))
    s2 = report["status_after_second_pass"]["stats"]
    report["summary"] = {
        "stores_first_pass": report["status_after_first_pass"]["stats"]["stores"],
        "loads_second_pass": s2["hits"],
        "tokens_loaded_back": s2["hit_tokens"],
        "cached_tokens_second_pass": [r["again"]["cached_tokens"] for r in report["requests"]],
        "docs": len(report["requests"]),
        "same_answers_gpu_hit_control": sum(r["gpu_hit_same_answer"] for r in report["requests"]),
        "same_answers_evicpress": sum(r["same_answer"] for r in report["requests"]),
        "same_answers_static_int4": sum(r["same_answer"] for r in report["after_switch"]),
        "first_divergence_control_vs_again": [divergence(r["gpu_hit"], r["again"]) for r in report["requests"]],
        "verify_mismatches": report["status_final"]["stats"].get("verify_mismatches"),
        "stores_final": report["status_final"]["stats"]["stores"],
        "bad_request_status": report["bad_request"]["status"],
        "switched_to": report["switch"]["policy"],
        "prometheus_evicpress_series": len(report["prometheus"]),
    }
    (out / "smoke.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
