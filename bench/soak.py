"""GPU soak: a real SGLang server with the evicpress cache under memory pressure, policy
switches under traffic, and a check that it is alive, error-free and exact afterwards.

Two servers run side by side on the GPU: the soaked one (a KV pool of about ``--pool-docs``
of the ``--docs`` documents, a small host arena, the disk tier, the background profiler)
and a reference with an unbounded cache and stock SGLang. For ``--minutes`` the soaked one
serves document questions (Zipf popularity) at a concurrency that cycles through
``--concurrency`` while ``POST /evicpress/policy`` switches the policy every
``--switch-s`` seconds through ``--policies``. Then its cache is flushed, a lossless policy
is set, and every document's fact question is asked twice (the second time from host or
disk); each answer must equal the reference's.

Passes when: the server is alive at the end, 0 internal errors, no SGLang memory-leak
message in its log, and the fact answers equal the reference's. Writes ``soak.json`` and
both servers' logs to ``--out``.

Usage: python bench/soak.py --model DIR --out DIR [--minutes 8] [-- extra sglang args]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from evicpress_sglang.bench.server import Server, parse_server_args, server_command, server_parser
from evicpress_sglang.bench.workload import QUESTIONS, doc_texts, docqa_prompt, fact_question

LOSSLESS_POLICY = "lru-offload"
LEAK = re.compile(r"leak detected", re.IGNORECASE)


def _args(argv: list[str]) -> argparse.Namespace:
    p = server_parser(__doc__.split("\n\n")[0], port=30200, docs=24, max_new_tokens=24)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--pool-docs", type=float, default=5.0, help="documents the soaked server's KV pool holds")
    p.add_argument("--tokens-per-doc", type=int, default=2400)
    p.add_argument("--host-bytes", default="64MiB")
    p.add_argument("--disk-bytes", default="2GiB")
    p.add_argument("--switch-s", type=float, default=30.0)
    p.add_argument("--policies", default="evicpress,static:int2,static:keydiff:0.3+int8,lru,off")
    p.add_argument("--concurrency", default="1,4,16,8,2", help="levels cycled through, one per --switch-s")
    p.add_argument("--seed", type=int, default=0)
    return parse_server_args(p, argv)


def generate(url: str, text: str, max_new_tokens: int) -> dict:
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens}}, timeout=300)
    r.raise_for_status()
    return r.json()


class Traffic:
    """Document questions from worker threads; the number of active workers follows the
    concurrency level of the moment."""

    def __init__(self, url: str, texts: list[str], args: argparse.Namespace) -> None:
        self.url, self.texts, self.args = url, texts, args
        self.rng = np.random.default_rng(args.seed)
        weights = 1.0 / np.arange(1, len(texts) + 1)
        self.popularity = weights / weights.sum()
        self.level = 1
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.served = 0
        self.errors: Counter = Counter()

    def _prompt(self) -> str:
        with self.lock:
            d = int(self.rng.choice(len(self.texts), p=self.popularity))
            q = fact_question(d) if self.rng.random() < 0.5 else QUESTIONS[int(self.rng.integers(len(QUESTIONS)))]
        return docqa_prompt(self.texts[d], q)

    def worker(self, index: int) -> None:
        while not self.stop.is_set():
            if index >= self.level:
                time.sleep(0.05)
                continue
            try:
                generate(self.url, self._prompt(), self.args.max_new_tokens)
                with self.lock:
                    self.served += 1
            except requests.HTTPError as e:
                with self.lock:
                    self.errors[f"HTTP {e.response.status_code}"] += 1
            except requests.RequestException as e:
                with self.lock:
                    self.errors[type(e).__name__] += 1
                time.sleep(0.5)


def switch_policy(url: str, policy: str) -> dict:
    r = requests.post(url + "/evicpress/policy", json={"policy": policy}, timeout=60)
    entry = {"policy": policy, "http": r.status_code}
    try:
        json.loads(r.text)  # every admin reply must be valid JSON
        entry["json"] = True
    except ValueError:
        entry["json"] = False
    return entry


def soak(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    texts, codes = doc_texts(rng, args.docs, args.doc_chars, args.doc_chars + 1000)
    common = server_command(args)
    pool = int(args.pool_docs * args.tokens_per_doc)
    settings = {"host_bytes": args.host_bytes, "disk_dir": str(args.out / "disk"), "disk_bytes": args.disk_bytes,
                "host_codecs": "bf16,fp8,int8,int4,int2,keydiff:0.3+int8"}
    env = os.environ | {"EVICPRESS_CONFIG": json.dumps(settings)}
    soaked = Server(common + ["--port", str(args.port), "--radix-cache-backend", "evicpress",
                              "--max-total-tokens", str(pool)], env, args.out / "evicpress.log", args.port)
    reference = Server(common + ["--port", str(args.port + 1)], dict(os.environ), args.out / "reference.log",
                       args.port + 1)
    result: dict = {"command": shlex.join([sys.executable, *sys.argv]), "settings": settings, "pool_tokens": pool}
    with soaked as url, reference as ref_url:
        traffic = Traffic(url, texts, args)
        levels = [int(x) for x in args.concurrency.split(",")]
        policies = args.policies.split(",") + [args.policies.split(",")[0]]
        switches = []
        with ThreadPoolExecutor(max(levels)) as pool_exec:
            for i in range(max(levels)):
                pool_exec.submit(traffic.worker, i)
            t0 = time.monotonic()
            step = 0
            while time.monotonic() - t0 < args.minutes * 60:
                traffic.level = levels[step % len(levels)]
                switches.append(switch_policy(url, policies[step % len(policies)]) | {
                    "t": round(time.monotonic() - t0, 1), "concurrency": traffic.level})
                step += 1
                time.sleep(max(0.0, min(args.switch_s, args.minutes * 60 - (time.monotonic() - t0))))
            traffic.stop.set()
        result["traffic"] = {"seconds": round(time.monotonic() - t0, 1), "served": traffic.served,
                             "errors": dict(traffic.errors), "switches": switches}
        result["status_after_traffic"] = requests.get(url + "/evicpress/status", timeout=60).json()
        # Exactness: from an empty cache under a lossless policy, each fact question twice.
        requests.post(url + "/flush_cache", timeout=60)
        switches.append(switch_policy(url, LOSSLESS_POLICY))
        # The reference asks twice too, so round 2 compares a cached prefix with a cached prefix
        # (its from its own GPU cache, ours loaded back from host or disk).
        facts = []
        for rnd in range(2):
            for d in range(args.docs):
                prompt = docqa_prompt(texts[d], fact_question(d))
                got, want = generate(url, prompt, args.max_new_tokens), generate(ref_url, prompt, args.max_new_tokens)
                facts.append({"doc": d, "round": rnd, "answer": got["text"], "reference": want["text"],
                              "cached_tokens": got["meta_info"].get("cached_tokens"), "code": codes[d]})
        result["facts"] = facts
        status = requests.get(url + "/evicpress/status", timeout=60).json()
        alive = requests.get(url + "/health", timeout=30).status_code == 200
    log_text = (args.out / "evicpress.log").read_text(errors="replace")
    health = status["health"]
    result["status_end"] = status
    result["checks"] = {
        "alive_at_end": alive,
        "internal_errors": health["internal_errors"],
        "degraded": health["degraded"],
        "leak_messages": len(LEAK.findall(log_text)),
        "fact_answers_equal_reference": sum(f["answer"] == f["reference"] for f in facts),
        "fact_questions": len(facts),
        "admin_replies_json": all(s["json"] for s in switches),
    }
    c = result["checks"]
    result["passed"] = (c["alive_at_end"] and c["internal_errors"] == 0 and c["leak_messages"] == 0
                        and c["fact_answers_equal_reference"] == c["fact_questions"] and c["admin_replies_json"])
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    r = soak(args)
    st = r["status_end"]["stats"]
    print(json.dumps({"passed": r["passed"], "checks": r["checks"], "served": r["traffic"]["served"],
                      "http_errors": r["traffic"]["errors"], "stores": st["stores"], "loads": st["hits"]}, indent=1))
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
