"""``--workload trace:FILE``: replay your own traffic instead of a seeded workload.

The seeded workloads (``docqa``, ``chat``) say how the policies compare on document QA
and chat built from the Python documentation; a trace says how they compare on the
traffic you actually serve. Every policy is sent the same requests at the same times,
exactly as with the seeded workloads.

FILE is JSON Lines: one JSON object per line, one request per object. Blank lines are
skipped. Fields:

* ``"prompt"`` (string) *or* ``"input_ids"`` (list of token ids, integers >= 0), exactly
  one of the two. Text is sent to SGLang's ``/generate`` as ``text`` and tokenized by the
  server; ids are sent as ``input_ids`` unchanged, so they must come from the served
  model's tokenizer.
* ``"t"`` (number, seconds >= 0, required): the arrival time. The whole trace is shifted so
  that its earliest request arrives when the replay starts: offsets from the start of a
  recording (0.0, 0.4, ...) and absolute Unix timestamps (1718000000.0, ...) both work, and
  gaps between requests are kept as they are. Lines need not be in time order: requests
  are sent in order of ``t``, ties in file order.
* ``"max_new_tokens"`` (integer >= 1, optional): this request's output length; without it,
  the bench's ``--max-new-tokens``. Decoding is greedy and ignores EOS (as for the seeded
  workloads), so every policy decodes the same number of tokens.
* ``"truth"`` (non-empty string, optional): a ground-truth answer. An answer is correct when
  it contains this string, the way the planted-fact questions of ``docqa`` are scored
  (``fact acc.`` in the table).
* ``"context"`` (non-empty string, optional): which document or session the prompt builds
  on. It labels the request in ``workload.json`` and counts towards the run's contexts and
  their size estimate (``contexts``, ``context_tokens_est`` in ``bench.json``); without it,
  the request is its own context.

Any other field is an error (a misspelt ``max_tokens`` would otherwise be ignored
silently). The file is checked whole before any server starts: every bad line is reported
with its line number and field, and nothing runs. A request's id in the results is its
line number in FILE, so a result can be traced back to the line that asked it.

Example, shortened from ``bench/examples/trace-example.jsonl`` (its token ids are
arbitrary ones within SmolLM2's vocabulary, there to show the format)::

    {"t": 0.0, "context": "release-notes", "prompt": "...", "max_new_tokens": 8, "truth": "48213"}
    {"t": 0.5, "context": "ids-session", "input_ids": [1, 504, 3458, 314, 260, 3767, 30, 216], "max_new_tokens": 4}
    {"t": 0.8, "prompt": "Say hello in French."}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .workload import BenchRequest

PREFIX = "trace:"
FIELDS = ("prompt", "input_ids", "t", "max_new_tokens", "truth", "context")
MAX_SHOWN = 20  # errors listed in full; a file that is wrong throughout says how many more


class TraceError(ValueError):
    """The trace file cannot be replayed; the message lists every bad line it found."""


def is_trace(workload: str) -> bool:
    return workload.startswith(PREFIX)


def load(path: str | Path) -> list[BenchRequest]:
    """Every request of the trace at ``path``, in arrival order, the earliest at t=0.

    Raises :class:`TraceError` naming each bad line (number and field) if any line is
    bad: a bench that ran half a trace would compare policies on a workload nobody asked
    for.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"cannot read trace {path}: {e}") from e
    reqs, errors = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            reqs.append(_request(number, line))
        except TraceError as e:
            errors.append(f"{path} line {number}: {e}")
    if errors:
        more = f"\n... and {len(errors) - MAX_SHOWN} more bad lines" if len(errors) > MAX_SHOWN else ""
        raise TraceError("\n".join(errors[:MAX_SHOWN]) + more)
    if not reqs:
        raise TraceError(f"trace {path} has no requests")
    start = min(r.t for r in reqs)
    for r in reqs:
        r.t = round(r.t - start, 6)  # to the µs: drops the float noise of subtracting epoch seconds
    return sorted(reqs, key=lambda r: r.t)  # stable: ties keep file order


def _request(number: int, line: str) -> BenchRequest:
    """One line as a request; the TraceError names the first field that is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise TraceError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    if ("prompt" in obj) == ("input_ids" in obj):
        raise TraceError('exactly one of "prompt" and "input_ids" is needed, got '
                         + ("both" if "prompt" in obj else "neither"))
    if "t" not in obj:
        raise TraceError('"t" (arrival time, seconds) is missing')
    t = obj["t"]
    if not _is_number(t) or not math.isfinite(t) or t < 0:
        raise TraceError(f'"t" must be a finite number of seconds >= 0, got {_show(t)}')
    max_new = obj.get("max_new_tokens")
    if max_new is not None and (not _is_int(max_new) or max_new < 1):
        raise TraceError(f'"max_new_tokens" must be an integer >= 1, got {_show(max_new)}')
    ids = obj.get("input_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise TraceError(f'"input_ids" must be a non-empty list of token ids, got {_show(ids)}')
        bad = next((i for i, x in enumerate(ids) if not _is_int(x) or x < 0), None)
        if bad is not None:
            raise TraceError(f'"input_ids"[{bad}] must be a token id (integer >= 0), got {_show(ids[bad])}')
    for key in ("prompt", "truth", "context"):
        if key in obj and (not isinstance(obj[key], str) or not obj[key]):
            raise TraceError(f'"{key}" must be a non-empty string, got {_show(obj[key])}')
    return BenchRequest(id=number, t=float(t), context=obj.get("context", f"line{number}"),
                        prompt=obj.get("prompt", ""), truth=obj.get("truth"), input_ids=ids, max_new_tokens=max_new)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not the id 1


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(x: Any) -> str:
    text = json.dumps(x)
    return text if len(text) <= 40 else text[:37] + "..."
