"""Replay a workload against a running server, open loop, and time every request.

Requests are sent at their arrival times whatever the server's pace (open loop: a slow
policy builds a queue, as it would in production). Each is streamed so the time to the
first token (TTFT) is seen by the client, as a user would see it. Greedy decoding with
a fixed output length (the bench's, or a trace request's own) keeps the decode work
identical across policies.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from .workload import BenchRequest


def send(url: str, req: BenchRequest, max_new_tokens: int, timeout: float = 600) -> dict:
    """One streamed request; TTFT is the first streamed chunk, which carries the first token.

    ``max_new_tokens`` is the default for requests that do not carry their own. Token ids
    go to SGLang as ``input_ids`` (its ``/generate`` takes text or ids, not both), so a
    trace recorded as ids is served exactly those tokens.
    """
    prompt = {"text": req.prompt} if req.input_ids is None else {"input_ids": req.input_ids}
    n = max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    body = prompt | {"stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    t0 = time.perf_counter()
    ttft, last = None, None
    try:
        with requests.post(url + "/generate", json=body, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # SGLang streams a failed request as an error chunk
                    return {"id": req.id, "error": str(chunk["error"])[:500]}
                if ttft is None:
                    ttft = time.perf_counter() - t0
                last = chunk
    except (requests.RequestException, ValueError) as e:
        return {"id": req.id, "error": f"{type(e).__name__}: {e}"}
    if last is None:
        return {"id": req.id, "error": "no output streamed"}
    meta = last.get("meta_info", {})
    return {"id": req.id, "ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "text": last.get("text", ""),
            "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens", 0),
            "completion_tokens": meta.get("completion_tokens")}


def replay(url: str, reqs: list[BenchRequest], max_new_tokens: int, progress: bool = True,
           time_scale: float = 1.0, workers: int = 64) -> list[dict]:
    """Every request at ``t * time_scale`` after the start; results in request order.
    ``max_new_tokens`` is for requests without their own (see :func:`send`)."""
    from tqdm import tqdm

    results: dict[int, dict] = {}
    bar = tqdm(total=len(reqs), desc="requests", disable=not progress, leave=False)
    lock = threading.Lock()
    start = time.perf_counter()

    def one(req: BenchRequest) -> None:
        delay = start + req.t * time_scale - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter() - start
        out = send(url, req, max_new_tokens)
        out["sent_s"] = sent
        with lock:
            results[req.id] = out
            bar.update()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, reqs))
    bar.close()
    return [results[r.id] for r in reqs]
