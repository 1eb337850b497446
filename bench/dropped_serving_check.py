"""GPU check that SGLang serves a token-dropped context the way the model answers with the same
kept tokens (issue 24: the selector harness and the SGLang bench rank the selectors oppositely;
a serving path that gave other KV than the kept tokens' would explain it, and would be wrong KV).

For each selector, one server whose only store for evicted contexts is the disk, under
``static:<selector>:<ratio>``: every document's question is asked once (full KV; the pool holds
about three documents, so the earlier ones are evicted onto disk, token-dropped, as the later
ones arrive), fresh filler documents push the last ones out too, every blob on disk is read (its
radix node's tokens, the blob's ``meta.tokens``, and the positions it kept, the payload's
header: read before any load-back, which deletes the blob it loads), and every question is asked
again (served from the blobs). Each filler is asked once only: a filler asked again would be
loaded back from disk and push the documents out in another order than they came. HF
transformers answers each prompt twice on its own: with every token, and with exactly the tokens
the blobs kept wherever a blob's tokens occur in the prompt (the prompt's last token recomputed,
as SGLang does). A document is *measured* when its blob was read and SGLang's second answer
reused exactly as many cached tokens as HF kept (a document loaded back before the blobs were
read, and dropped again after, is not). Reported per selector, over the measured documents, as
mean token F1 and as the number of identical answers:

* ``served_vs_full``: SGLang's second answer against its first (what the bench measures);
* ``hf_dropped_vs_hf_full``: the same for HF with the same kept tokens (what the harness measures);
* ``served_vs_hf_dropped`` against ``full_vs_hf_full`` (SGLang's first answer against HF's): if the
  first is much lower than the second, the served KV is not the kept tokens' KV.

Usage: python bench/dropped_serving_check.py --model DIR --out DIR [--selectors keydiff,expected]
       [--ratio 0.5] [--query-model q.pt] [-- extra sglang args]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch

from evicpress_sglang.bench.server import Server, ask, parse_server_args, server_command, server_parser
from evicpress_sglang.bench.workload import QUESTIONS, doc_texts, docqa_prompt, fact_question
from evicpress_sglang.codecs import get_codec
from evicpress_sglang.codecs.drop import DropCodec
from evicpress_sglang.profiler.scores import token_f1
from evicpress_sglang.tiers import blob
from evicpress_sglang.tiers.disk import SUFFIX


def _args(argv: list[str]) -> argparse.Namespace:
    p = server_parser(__doc__.split("\n\n")[0], port=30400, docs=12, max_new_tokens=16)
    p.add_argument("--pool-tokens", type=int, default=8000, help="about 3 documents")
    p.add_argument("--selectors", default="keydiff,expected")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--query-model", default=None, help="for expected / kvzip")
    return parse_server_args(p, argv)


def read_blobs(disk_dir: Path) -> list[tuple[list[int], list[int], str]]:
    """(node tokens, kept positions within the node, codec) of every readable blob in ``disk_dir``."""
    found = []
    for path in sorted(disk_dir.glob(f"*{SUFFIX}")):
        raw = path.read_bytes()
        header, _ = blob.read_header(io.BytesIO(raw))
        enc, meta = blob.decode(raw, header["key"])
        codec = get_codec(enc.codec).device_codec
        tokens = [int(t) for t in (meta or {}).get("tokens", [])]
        kept = (codec.positions(enc).tolist() if isinstance(codec, DropCodec) else list(range(len(tokens))))
        found.append((tokens, kept, enc.codec))
    return found


#: Filler documents asked after the questioned ones, about 9k SmolLM2 tokens: more than the pool.
FILLERS = 4
#: What every filler starts with (the questioned documents start with "Document").
FILLER_OPENING = "Unrelated reading.\n\n"
#: Tokens a node must share with a prompt to be placed at its end (see :func:`kept_mask`).
MIN_OVERLAP = 16


def kept_mask(ids: list[int], blobs: list[tuple[list[int], list[int], str]]) -> tuple[torch.Tensor, list[dict]]:
    """For each of ``ids``: False where a blob's node occurs in ``ids`` and did not keep that token;
    and where each node that occurs was placed (offset, tokens, kept, codec: to trace a row later).
    A node occurs where its tokens start (the first such place) and run to its end or to the end of
    ``ids``: a radix node of a prompt asked before also holds the answer generated after it,
    which a prompt asked again does not; at least ``MIN_OVERLAP`` of its tokens (or all) must be
    in ``ids``, so that another prompt's node cannot match by its first token at the very end."""
    mask = torch.ones(len(ids), dtype=torch.bool)
    placed = []
    for tokens, kept, codec in blobs:
        overlap = min(len(tokens), MIN_OVERLAP)
        at = next((o for o in range(len(ids) - overlap + 1)
                   if tokens and ids[o:o + len(tokens)] == tokens[:len(ids) - o]), None)
        if at is None:
            continue
        inside = torch.zeros(len(tokens), dtype=torch.bool)
        inside[torch.tensor(kept, dtype=torch.long)] = True
        mask[at:at + len(tokens)] &= inside[:len(ids) - at]
        placed.append({"offset": at, "tokens": len(tokens), "kept": len(kept), "codec": codec})
    return mask, placed


def hf_answers(prompts: list[str], blobs: list[tuple[list[int], list[int], str]], max_new: int) -> list[dict]:
    """Per prompt: HF's full-KV answer and its answer keeping only what the ``blobs`` kept of it."""
    import selector_quality as harness  # the sibling script (bench/ is on the path when this one runs)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = harness.Runner(max_new, "sdpa", device, "bfloat16" if device == "cuda" else "float32")
    rows = []
    for prompt in prompts:
        ids = runner.tok(prompt)["input_ids"]
        k, v = runner.prefill(ids[:-1])
        keep, placed = kept_mask(ids[:-1], blobs)
        keep = keep.to(k.device)
        full = runner.text(runner.answer(k, v, len(ids) - 1, ids[-1:]))
        dropped = runner.text(runner.answer(k[:, keep], v[:, keep], len(ids) - 1, ids[-1:]))
        rows.append({"hf_full": full, "hf_dropped": dropped, "kept": int(keep.sum()), "tokens": len(ids) - 1,
                     "blobs": placed})
    return rows


def run_selector(args: argparse.Namespace, selector: str, prompts: list[str], fillers: list[str]) -> dict:
    out = args.out / selector
    out.mkdir(parents=True, exist_ok=True)
    codec = f"{selector}:{args.ratio}"
    settings = {"policy": f"static:{codec}", "host_codecs": ["bf16"], "host_bytes": "1MiB",
                "disk_dir": str(out / "disk"), "disk_bytes": "8GiB", "disk_codecs": [codec]}
    if args.query_model:
        settings["query_model"] = args.query_model
    env = os.environ | {"EVICPRESS_CONFIG": json.dumps(settings)}
    cmd = server_command(args) + ["--port", str(args.port), "--radix-cache-backend", "evicpress",
                                  "--max-total-tokens", str(args.pool_tokens)]
    with Server(cmd, env, out / "server.log", args.port) as url:
        first = [ask(url, prompt, args.max_new_tokens) for prompt in prompts]
        for text in fillers:  # push the last documents out of the pool, onto disk
            ask(url, text, args.max_new_tokens)
        time.sleep(2)  # let the disk writer finish
        found = read_blobs(out / "disk")
        rounds = [{"first": f, "again": ask(url, prompt, args.max_new_tokens)} for f, prompt in zip(first, prompts)]
        status = requests.get(url + "/evicpress/status", timeout=60).json()
    rows = [r | h for r, h in zip(rounds, hf_answers(prompts, found, args.max_new_tokens))]
    return {"settings": settings, "rows": rows, "hits": status["stats"]["hits"],
            "internal_errors": status["health"]["internal_errors"], **summarise(rows)}


#: The answer pairs compared (see the module docstring).
PAIRS = {"served_vs_full": ("again", "first"), "hf_dropped_vs_hf_full": ("hf_dropped", "hf_full"),
         "served_vs_hf_dropped": ("again", "hf_dropped"), "full_vs_hf_full": ("first", "hf_full")}


def summarise(rows: list[dict]) -> dict:
    """Mean token F1 and identical answers of each of :data:`PAIRS` over the measured rows: those
    HF dropped tokens from and whose second SGLang answer reused exactly the tokens HF kept (each
    row is marked ``measured`` in place)."""
    for x in rows:
        x["measured"] = x["kept"] < x["tokens"] and x["kept"] == x["again"]["cached_tokens"]
    measured = [x for x in rows if x["measured"]]
    f1 = {name: float(np.mean([token_f1(_text(x, a), _text(x, b)) for x in measured])) if measured else None
          for name, (a, b) in PAIRS.items()}
    identical = {name: sum(_text(x, a) == _text(x, b) for x in measured) for name, (a, b) in PAIRS.items()}
    return {"docs_measured": len(measured), **f1, "identical": identical}


def _text(row: dict, key: str) -> str:
    value = row[key]
    return (value["answer"] if isinstance(value, dict) else value).strip()


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    texts, _ = doc_texts(np.random.default_rng(0), args.docs, args.doc_chars, args.doc_chars + 1000)
    # half the questions ask for the planted fact, half are the bench's open questions
    prompts = [docqa_prompt(t, fact_question(d) if d % 2 == 0 else QUESTIONS[d // 2 % len(QUESTIONS)])
               for d, t in enumerate(texts)]
    # A filler must share no first token with a questioned document: fillers titled "Document 0".."3", as
    # doc_texts titles them, matched documents 0-3's first tokens and brought them back from disk.
    filler_texts, _ = doc_texts(np.random.default_rng(1), FILLERS, args.doc_chars, args.doc_chars + 1000)
    fillers = [docqa_prompt(FILLER_OPENING + t, "Summarize the text above.") for t in filler_texts]
    result = {"command": shlex.join([sys.executable, *sys.argv]), "selectors": {}}
    for selector in args.selectors.split(","):
        result["selectors"][selector] = run_selector(args, selector, prompts, fillers)
        (args.out / "dropped_serving.json").write_text(json.dumps(result, indent=1))
    summary = {s: {k: r[k] for k in ("docs_measured", *PAIRS, "identical", "internal_errors")}
               for s, r in result["selectors"].items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
