"""CPU / HF proxy of the GPU selector comparison (issue 24): answer agreement with full KV.

SmolLM2-135M-Instruct (real weights), HF transformers, fp32, CPU. For a few requests of the
GPU run's workload (docqa seed 0, 30 docs, 6000-20000 chars, 90 requests): prefill the
document, drop tokens with the REAL selectors of ``evicpress_sglang.codecs.drop`` (``select``
on the layer-stacked post-RoPE K in the pool layout [layers, tokens, kv_heads, head_dim] and
V), then answer the question greedily (16 tokens) from the kept KV only, the kept tokens at
their original positions and the question continuing at the ORIGINAL length (as SGLang does
with a dropped context), and score token F1 (``profiler.scores.token_f1``) against the
full-KV answer. Variants (hypotheses) are scored the same way through ``VARIANTS``.

    cd bench/results/2026-12-01-query-aware-selectors
    PYTHONPATH=/work/wt-selectors python answer_agreement_study.py --requests 8 --ratios 0.5

Prefill KV is cached under --cache (default /tmp/aas) so reruns only pay for the answers.
Needs a query model: ``python -m evicpress_sglang.cli query-model --out /tmp/aas/q.pt``.
"""
import argparse, json, math, os, sys, time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from evicpress_sglang.bench.workload import QUESTIONS, docqa, docqa_prompt
from evicpress_sglang.codecs import queries
from evicpress_sglang.codecs.drop import SELECTORS, ContextKV, _standardised
from evicpress_sglang.model import cache_dir
from evicpress_sglang.profiler.scores import token_f1

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--requests", type=int, default=8)
ap.add_argument("--ratios", default="0.5")
ap.add_argument("--variants", default="")  # comma list; default: the real selectors only
ap.add_argument("--max-doc-tokens", type=int, default=3200)
ap.add_argument("--distinct-docs", action="store_true", help="one request per document (first in arrival order)")
ap.add_argument("--cache", default="/tmp/aas")
ap.add_argument("--query-model", default="/tmp/aas/q.pt")
ap.add_argument("--json", default="")
ap.add_argument("--context", choices=("doc", "prompt", "split-rel", "split-abs", "chunk-rel", "chunk-abs"), default="doc",
                help="doc: the stored context is the document, the question is recomputed (a new question on a "
                     "seen document); prompt: it is an earlier identical request's prompt + answer, as SGLang's "
                     "radix cache stores it, and the request reuses all of its prompt but the last token; split-*: the same, "
                     "but stored as SGLang's two radix nodes once another question on the document split it (the "
                     "document up to 'Question:', then the question tail + answer), each dropped on its own, the "
                     "selector given positions relative to the node (rel: what store.py passes for a fresh node) "
                     "or the tokens' real positions (abs); chunk-*: doc, stored as radix nodes cut every --chunk "
                     "tokens (as chunked prefill inserts them), each dropped on its own, rel/abs as for split")
ap.add_argument("--chunk", type=int, default=1024)
ap.add_argument("--bf16-select", action="store_true", help="selectors read K/V rounded to bf16 (SGLang's pool dtype)")
args = ap.parse_args()
Path(args.cache).mkdir(parents=True, exist_ok=True)
if os.path.exists(args.query_model):
    queries.use(args.query_model)

P = str(cache_dir() / "smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(P)
model = AutoModelForCausalLM.from_pretrained(P, dtype=torch.float32).eval()
cfg = model.config
L, KVH, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
NEW = 16


def split(prompt: str) -> tuple[list[int], int]:
    """Prompt ids and the context length: the document's tokens (the prefix every question on
    the document shares, what the radix cache evicts and a later request reuses)."""
    ids = tok(prompt)["input_ids"]
    doc = prompt[: prompt.rindex("\n\nQuestion:")]
    dids = tok(doc)["input_ids"]
    n = 0
    while n < len(dids) and dids[n] == ids[n]:
        n += 1
    return ids, n


@torch.no_grad()
def context_kv(key: str, ctx: list[int]):
    f = Path(args.cache) / f"kv_{key}.pt"
    if f.exists():
        return torch.load(f)
    cache = DynamicCache(config=cfg)
    model(torch.tensor([ctx]), past_key_values=cache, use_cache=True)
    k = torch.stack([cache.layers[i].keys[0].transpose(0, 1) for i in range(L)])  # [L, n, KVH, D]
    v = torch.stack([cache.layers[i].values[0].transpose(0, 1) for i in range(L)])
    torch.save((k, v), f)
    return k, v


@torch.no_grad()
def answer(k, v, kept_pos, n, rest: list[int]) -> str:
    """Greedy NEW tokens (ignore_eos, as the GPU bench) from the kept KV ([L, m, KVH, D], positions kept_pos) and the rest of
    the prompt at positions n, n+1, ... (cache slots m, m+1, ... for the causal mask)."""
    cache = DynamicCache(config=cfg)
    for i in range(L):
        cache.update(k[i].transpose(0, 1)[None].contiguous(), v[i].transpose(0, 1)[None].contiguous(), i)
    m = k.shape[1]
    x = torch.tensor([rest])
    pos, slot = n, m
    out = []
    for _ in range(NEW):
        t = x.shape[1]
        logits = model(x, past_key_values=cache, use_cache=True,
                       position_ids=torch.arange(pos, pos + t)[None],
                       cache_position=torch.arange(slot, slot + t)).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)  # no stop at EOS: the GPU bench sends ignore_eos
        pos, slot = pos + t, slot + t
        x = torch.tensor([[nxt]])
    return tok.decode(out, skip_special_tokens=True)


# ---- variants: (K, V, positions, keep) -> kept indices --------------------------------------
def top(score, keep):
    return torch.topk(score, keep).indices


def real(name):
    def f(k, v, pos, ratio, start=0):
        return SELECTORS[name](ratio).select(ContextKV(k, lambda: v, pos, start))
    return f


VARIANTS = {name: real(name) for name in ("keydiff", "expected", "kvzip", "knorm", "streaming")}


def register(name):
    def deco(fn):
        VARIANTS[name] = fn
        return fn
    return deco


def select_with(score_fn):
    """score_fn(k, v, pos) -> per-token score (higher = keep); wraps the keep-count rule."""
    def f(k, v, pos, ratio, start=0):
        sel = SELECTORS["keydiff"](ratio)
        keep = sel.kept(k.shape[1])
        return torch.sort(top(score_fn(k, v, pos + start), keep)).values
    return f


def ea_logit(k, pos, future=256, cov_scale=1.0, mean_scale=1.0):
    layers, _, heads, d = k.shape
    qm = queries.active().on(k.device, layers, heads, d)
    fut = pos[-1] + 1 + torch.arange(future)
    eye = torch.eye(d)[:, None, None, :].expand(d, future, 1, d)
    turn = queries.rope(eye, fut, qm.inv_freq).mean(1)[:, 0]
    mean = qm.mean @ turn
    cov = turn.T @ qm.cov @ turn
    k = k.float()
    logit = mean_scale * torch.einsum("lhd,lthd->lth", mean, k) / math.sqrt(d)
    if cov_scale:
        logit = logit + cov_scale * torch.einsum("lthd,lhde,lthe->lth", k, cov, k) / (2 * d)
    return logit  # [L, n, H]


def keydiff_raw(k):
    unit = torch.nn.functional.normalize(k.float(), dim=-1)
    anchor = torch.nn.functional.normalize(unit.mean(dim=1, keepdim=True), dim=-1)
    return -(unit * anchor).sum(-1)  # [L, n, H]


def vlog(v):
    return v.float().norm(dim=-1).clamp_min(1e-6).log()


for F in (1, 16, 256, 2048):
    VARIANTS[f"ea_F{F}"] = select_with(lambda k, v, p, F=F: _standardised(ea_logit(k, p, F) + vlog(v)))
VARIANTS["ea_novnorm"] = select_with(lambda k, v, p: _standardised(ea_logit(k, p)))
VARIANTS["ea_nocov"] = select_with(lambda k, v, p: _standardised(ea_logit(k, p, cov_scale=0) + vlog(v)))
VARIANTS["ea_cov_only"] = select_with(lambda k, v, p: _standardised(ea_logit(k, p, mean_scale=0) + vlog(v)))
VARIANTS["vnorm_only"] = select_with(lambda k, v, p: _standardised(vlog(v)))
VARIANTS["neg_ea"] = select_with(lambda k, v, p: -_standardised(ea_logit(k, p) + vlog(v)))
for a in (0.25, 0.5, 0.75):
    VARIANTS[f"hyb{a}"] = select_with(
        lambda k, v, p, a=a: a * _standardised(ea_logit(k, p) + vlog(v)) + (1 - a) * _standardised(keydiff_raw(k)))
for lo, hi in ((0, 10), (10, 20), (20, 30), (1, 30), (2, 30)):
    VARIANTS[f"ea_L{lo}-{hi}"] = select_with(
        lambda k, v, p, lo=lo, hi=hi: _standardised((ea_logit(k, p) + vlog(v))[lo:hi]))
    VARIANTS[f"kd_L{lo}-{hi}"] = select_with(lambda k, v, p, lo=lo, hi=hi: _standardised(keydiff_raw(k)[lo:hi]))


def std3(s):
    s = s.float()
    return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-6)


VARIANTS["ea_maxhead"] = select_with(lambda k, v, p: std3(ea_logit(k, p) + vlog(v)).amax(dim=(0, 2)))
VARIANTS["kd_maxhead"] = select_with(lambda k, v, p: std3(keydiff_raw(k)).amax(dim=(0, 2)))
VARIANTS["random"] = lambda k, v, p, r, start=0: torch.sort(torch.randperm(k.shape[1], generator=torch.Generator().manual_seed(0))[: SELECTORS["keydiff"](r).kept(k.shape[1])]).values


# ---- run --------------------------------------------------------------------------------------
reqs = docqa(n_requests=90, docs=30, rate=6.0, min_chars=6000, max_chars=20000, seed=0)
chosen, seen = [], set()
for r in reqs:
    key = r.context if args.distinct_docs else (r.context, r.prompt[r.prompt.rindex("\n\nQuestion:"):])
    if key in seen:
        continue
    seen.add(key)
    ids, n = split(r.prompt)
    if n > args.max_doc_tokens:
        continue
    chosen.append((r, ids, n))
    if len(chosen) == args.requests:
        break

def split_point(r):
    """Where another question on the same document diverges from this request's prompt (in tokens)."""
    doc = r.prompt[: r.prompt.rindex("\n\nQuestion:")]
    a, b = (tok(docqa_prompt(doc, q))["input_ids"] for q in ("What is the access code? Reply.", QUESTIONS[0]))
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


names = [x for x in args.variants.split(",") if x] or list(SELECTORS_ORDER := ("keydiff", "expected", "kvzip", "knorm", "streaming"))
ratios = [float(x) for x in args.ratios.split(",")]
rows = {}
t0 = time.time()
for r, ids, n in chosen:
    k, v = context_kv(f"{r.id}_{n}", ids[:n])
    pos = torch.arange(n)
    fullf = Path(args.cache) / f"full_{r.id}_{n}.txt"
    if not fullf.exists():
        fullf.write_text(answer(k, v, pos, n, ids[n:]))
    full = fullf.read_text()
    if args.context not in ("doc", "chunk-rel", "chunk-abs"):
        # SGLang inserts prompt + output (but its last token) into the radix tree; the identical request
        # that comes later matches all of its prompt but the last token, which it recomputes
        stored = ids + tok(full, add_special_tokens=False)["input_ids"][:NEW - 1]
        k, v = context_kv(f"p{r.id}_{len(stored)}", stored)
        pos, use = torch.arange(len(stored)), len(ids) - 1
    else:
        use = n
    for ratio in ratios:
        for name in names:
            ks, vs = (k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()) if args.bf16_select else (k, v)
            if args.context.startswith(("split", "chunk")):
                cuts = [0, split_point(r)] if args.context.startswith("split") else list(range(0, n, args.chunk))
                parts = []
                for lo, hi in zip(cuts, cuts[1:] + [k.shape[1]]):
                    # positions relative to the node, as store.py passes them; -abs: with the node's start
                    start = lo if args.context.endswith("-abs") else 0
                    parts.append(lo + VARIANTS[name](ks[:, lo:hi], vs[:, lo:hi], torch.arange(hi - lo), ratio, start))
                idx = torch.cat(parts)
            else:
                idx = VARIANTS[name](ks, vs, pos, ratio)
            idx = idx[idx < use]
            ans = answer(k[:, idx], v[:, idx], pos[idx], use, ids[use:])
            rows.setdefault((name, ratio), []).append((r.id, token_f1(ans, full), ans == full, ans))
    print(f"req {r.id} {r.context} n={n} q={r.prompt[r.prompt.rindex('Question:'):][:40]!r} full={full!r} "
          f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print("   " + " ".join(f"{nm}@{ra}={rows[(nm, ra)][-1][1]:.2f}" for ra in ratios for nm in names), file=sys.stderr, flush=True)

print(f"| variant | ratio | mean F1 | identical | n |")
print("| --- | --- | --- | --- | --- |")
for (name, ratio), rs in rows.items():
    print(f"| {name} | {ratio} | {np.mean([x[1] for x in rs]):.3f} | {np.mean([x[2] for x in rs]):.0%} | {len(rs)} |")
if args.json:
    Path(args.json).write_text(json.dumps({f"{n}@{r}": v for (n, r), v in rows.items()}, indent=1))
