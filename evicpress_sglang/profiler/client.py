"""The profiler's view of a server: its own HTTP API, nothing else.

The profiler asks the server for jobs, sends ordinary ``/generate`` requests in profile
namespaces and reports what it measured, all over HTTP, so it runs the same inside the
server (a thread of the HTTP process) or beside it (``evicpress-sglang profile --url``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import requests

#: Request ids of the profiler's own requests start with this (visible in SGLang's logs).
RID_PREFIX = "evp-profile-"


class ServerError(RuntimeError):
    """The server refused or failed a profiler request."""


@dataclass
class Answer:
    text: str
    ids: list[int]


@dataclass
class TeacherForced:
    logprobs: list[float]  # of each reference token
    top1: list[int]  # the token the KV would have chosen at each of those positions


class ServerClient:
    def __init__(self, url: str, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = 600.0, http=requests) -> None:
        """``api_key``: for ``/generate``; ``admin_key``: for the ``/evicpress/`` routes
        (defaults to ``api_key``, as the server does); ``http``: anything with requests'
        ``get``/``post`` (tests pass an in-process client)."""
        self.url = url.rstrip("/")
        self.http = http
        self.headers = _bearer(api_key)
        self.admin_headers = _bearer(admin_key or api_key)
        self.timeout = timeout

    def _post(self, path: str, body: dict) -> dict:
        headers = self.admin_headers if path.startswith("/evicpress/") else self.headers
        try:
            r = self.http.post(self.url + path, json=body, headers=headers, timeout=self.timeout)
        except (requests.RequestException, OSError) as e:
            raise ServerError(f"{path}: {e}") from None
        if r.status_code != 200:
            raise ServerError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def healthy(self) -> bool:
        try:
            return self.http.get(self.url + "/health", headers=self.headers, timeout=5).status_code == 200
        except (requests.RequestException, OSError):
            return False

    def jobs(self, want: int = 1, node: int | None = None) -> dict:
        """``{"jobs": [...], "refusal": ...}``: up to ``want`` new jobs (only when the
        scheduler has no waiting request), or the job for context ``node``."""
        return self._post("/evicpress/profile/jobs", {"node": node} if node is not None else {"want": want})

    def report(self, job: int, quality: dict[int, float], queries: int) -> dict:
        return self._post("/evicpress/profile/report",
                          {"job": job, "quality": {str(k): v for k, v in quality.items()}, "queries": queries})

    def tokenize(self, text: str) -> list[int]:
        """``text``'s tokens, by the server's tokenizer, without special tokens."""
        return list(self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"])

    def _generate(self, input_ids: list[int], namespace: str, max_new_tokens: int, **extra) -> dict:
        body = {"input_ids": input_ids, "extra_key": namespace, "rid": RID_PREFIX + uuid.uuid4().hex,
                "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}, **extra}
        return self._post("/generate", body)

    def answer(self, input_ids: list[int], namespace: str, max_new_tokens: int) -> Answer:
        """The greedy answer to ``input_ids`` served from ``namespace``'s KV."""
        out = self._generate(input_ids, namespace, max_new_tokens)
        if "output_ids" not in out:
            raise ServerError("/generate: the response has no output_ids")
        return Answer(out.get("text", ""), list(out["output_ids"]))

    def teacher_forced(self, input_ids: list[int], reference: list[int], namespace: str) -> TeacherForced:
        """Log-probability and top-1 choice at each token of ``reference`` appended to
        ``input_ids``, from one prefill (no generation) on ``namespace``'s KV."""
        if not reference:
            return TeacherForced([], [])
        out = self._generate(input_ids + reference, namespace, 1, return_logprob=True,
                             logprob_start_len=len(input_ids) - 1, top_logprobs_num=1)
        meta = out.get("meta_info", {})
        lps, tops = meta.get("input_token_logprobs") or [], meta.get("input_top_logprobs") or []
        n = len(reference)
        lps, tops = lps[-n:], tops[-n:]
        if len(lps) != n or len(tops) != n or [int(e[1]) for e in lps] != reference:
            raise ServerError(f"teacher-forced: logprobs do not line up with the {n} reference tokens")
        if any(e[0] is None for e in lps) or any(not t for t in tops):
            raise ServerError("teacher-forced: the server left reference positions without logprobs")
        return TeacherForced([float(e[0]) for e in lps], [int(t[0][1]) for t in tops])


def _bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}
