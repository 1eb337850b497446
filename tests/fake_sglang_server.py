"""A stand-in for an SGLang server, for testing the bench without a GPU.

Speaks the parts of SGLang's HTTP API the bench and the soak use: ``/health``,
``/generate`` (streamed as SSE ``data:`` lines with cumulative text and ``meta_info``, or
one JSON reply), ``/flush_cache`` and, with ``--evicpress``, ``/evicpress/status`` (its
store counters grow with every request) and ``/evicpress/policy`` (answers then depend on
the policy, except under ``lru``). A prompt seen before is a "cache hit": its
first token comes sooner and ``cached_tokens`` says so. Answers are a function of the
prompt, so a bench's quality maths has something real to score. A prompt may be
``text`` or ``input_ids`` (as SGLang's); with ``--record FILE`` every request body is
appended to FILE as one JSON line when it arrives, so a test can check what was sent and
in which order.

Usage: python tests/fake_sglang_server.py PORT [--evicpress] [--answer-salt S] [--record FILE]
       [--exit-after N] [--degrade-after N]
(or with SGLang's own ``--port PORT``; other SGLang arguments are ignored)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN: set[str] = set()
LOCK = threading.Lock()
EVICPRESS = "--evicpress" in sys.argv
SALT = sys.argv[sys.argv.index("--answer-salt") + 1] if "--answer-salt" in sys.argv else ""
RECORD = sys.argv[sys.argv.index("--record") + 1] if "--record" in sys.argv else None
#: Faults: the process exits on the generate request after this many; with --evicpress, status
#: reports the backend degraded to stock behaviour once this many were answered.
EXIT_AFTER = int(sys.argv[sys.argv.index("--exit-after") + 1]) if "--exit-after" in sys.argv else None
DEGRADE_AFTER = int(sys.argv[sys.argv.index("--degrade-after") + 1]) if "--degrade-after" in sys.argv else None
POLICY = ["evicpress"]
GENERATED = [0]  # requests answered: the status's store counter, so that deltas can be checked
#: A profiler that measured one of the two contexts reused twice or more (status's shape).
PROFILER = {"jobs": 3, "reported": 2, "staged": 8, "variants_measured": 6, "variants_tainted": 2, "expired": 0,
            "active_jobs": 1, "held_tokens": 40, "reserve_tokens": 100, "profiled_contexts": 1,
            "refusal": {"node": 9, "reason": "9 tokens, fewer than profile_min_tokens (128)"},
            "running": [{"job": 3, "reason": None}],
            "outcomes": {"1": {"reason": None}, "2": {"reason": "variant 1 (int8) partly matched: 3 of 9 tokens"}}}
PLACEMENTS = [{"node": 1, "held_out_queries": 3, "profiled_quality": {"int8": 0.9}},
              {"node": 2, "held_out_queries": 2, "profiled_quality": None},
              {"node": 3, "held_out_queries": 1, "profiled_quality": None}]


def answer(prompt: str, n: int) -> list[str]:
    if "access code" in prompt and "Reply with the number" in prompt:
        code = prompt.split("access code for document ")[1].split(" is ")[1].split(".")[0]
        return [code] + ["."] * (n - 1)
    # an evicpress server's answers depend on its policy (but lru re-prefills: the full KV's)
    salt = SALT + (POLICY[0] if EVICPRESS and POLICY[0] != "lru" else "")
    h = hashlib.sha256((prompt + salt).encode()).hexdigest()
    return [f" w{h[i % 60:i % 60 + 2]}" for i in range(n)]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET_status(self) -> None:
        self.path = "/evicpress/status"
        self.do_GET()

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/evicpress/status" and EVICPRESS:
            self._json(200, {"policy": POLICY[0], "health": {"internal_errors": 0, "degraded": (
                                 "a test fault" if DEGRADE_AFTER is not None and GENERATED[0] >= DEGRADE_AFTER else None)},
                             "contexts": len(SEEN), "planner": {"background": True, "plans": 1, "failed": False},
                             "stats": {"hit_tokens": {"host": 7 * GENERATED[0]}, "hits": {"host:int4": 1},
                                       "evict_ms": {"n": 3, "p50": 0.2, "p99": 0.9, "max": 1.1},
                                       "evict_hist": {"buckets_ms": ["0.5", "1.0", "inf"],
                                                      "counts": [GENERATED[0], GENERATED[0] // 10, 0],
                                                      "wait_counts": [GENERATED[0], 0, 0],
                                                      "steps": {"store": [GENERATED[0], 0, 0],
                                                                "drop": [0, 0, 0],
                                                                "fallback_drop": [0, GENERATED[0], 0]}},
                                       "plan": {"steps": 2, "fallback_drops": 1},
                                       "stores": {"host:int4": 2 + GENERATED[0]}, "bytes_loaded": {"host": 100},
                                       "raw_bytes_stored": 700 + 400 * GENERATED[0],
                                       "stored_bytes": 200 + 100 * GENERATED[0], "compression_ratio": 3.5},
                             "profiler": PROFILER, "placements": PLACEMENTS})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        if self.path == "/flush_cache":
            with LOCK:
                SEEN.clear()
            self._json(200, {})
            return
        if self.path == "/evicpress/policy" and EVICPRESS:
            POLICY[0] = body.get("policy", POLICY[0])
            self.do_GET_status()
            return
        if ("text" in body) == ("input_ids" in body):
            self._json(400, {"error": "exactly one of text and input_ids"})
            return
        prompt = body.get("text") or " ".join(map(str, body["input_ids"]))
        n = body["sampling_params"]["max_new_tokens"]
        with LOCK:
            hit = prompt in SEEN
            SEEN.add(prompt)
            GENERATED[0] += 1
            if EXIT_AFTER is not None and GENERATED[0] > EXIT_AFTER:
                os._exit(3)
            if RECORD:
                with open(RECORD, "a") as f:
                    f.write(json.dumps(body) + "\n")
        tokens = len(prompt.split())
        time.sleep(0.002 if hit else 0.02)  # prefill
        if not body.get("stream"):
            self._json(200, {"text": "".join(answer(prompt, n)), "meta_info": {
                "prompt_tokens": tokens, "cached_tokens": tokens - 1 if hit else 0, "completion_tokens": n}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        if "TOO LONG" in prompt:  # how SGLang reports a request it rejects mid-stream
            self.wfile.write(b'data: {"error": {"message": "input is longer than the context"}}\n\n')
            return
        text = ""
        for i, piece in enumerate(answer(prompt, n)):
            text += piece
            meta = {"prompt_tokens": tokens, "cached_tokens": tokens - 1 if hit else 0, "completion_tokens": i + 1}
            self.wfile.write(b"data: " + json.dumps({"text": text, "meta_info": meta}).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(0.001)
        self.wfile.write(b"data: [DONE]\n\n")


if __name__ == "__main__":
    EVICPRESS = EVICPRESS or "evicpress" in sys.argv  # as SGLang's --radix-cache-backend evicpress
    port = sys.argv[sys.argv.index("--port") + 1] if "--port" in sys.argv else sys.argv[1]
    ThreadingHTTPServer.request_queue_size = 128  # bursts of 16+ clients on a busy CI machine: no refused connects
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
