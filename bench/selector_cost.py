"""What choosing the kept tokens costs, per selector (issue 24: the Expected-Attention-style
selector must cost at most 5% of a prefill).

Times ``selector.select`` alone (the codec's scoring and top-k, no quantization or copy) on a
context's keys and values in the pool's layout ``[layers, tokens, kv_heads, head_dim]``, on
the GPU when there is one, for each selector at each context length; the figure is ms per
1k tokens of context. Keys are random: the work done does not depend on their values. The
query-aware selectors read the model's query model (``--query-model``, from
``evicpress-sglang query-model``) or, without one, a random model of the same shape.

Usage: python bench/selector_cost.py [--query-model q.pt] [--tokens 1024,4096,16384] --out FILE.json
(defaults: SmolLM2-135M's KV layout, 30 layers x 3 KV heads x 64)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from evicpress_sglang.codecs import drop, queries
from evicpress_sglang.timing import best_seconds


def random_query_model(layers: int, heads: int, d: int) -> queries.QueryModel:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(layers, heads, d, d, generator=g) / d ** 0.5
    return queries.QueryModel(mean=torch.randn(layers, heads, d, generator=g), cov=a @ a.transpose(-1, -2),
                              key_map=torch.randn(layers, heads, d, d, generator=g) / d ** 0.5,
                              key_bias=torch.randn(layers, heads, d, generator=g),
                              inv_freq=1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))


def time_selector(name: str, ratio: float, k: torch.Tensor, v: torch.Tensor, repeats: int) -> float:
    """Best wall seconds of one selection (device work included)."""
    selector = drop.SELECTORS[name](ratio)
    kv = drop.ContextKV.of(k, v, torch.arange(k.shape[1], device=k.device))

    selector.select(kv)  # first call: allocations, kernel selection
    return best_seconds(lambda: selector.select(kv), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--query-model")
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384])
    ap.add_argument("--selectors", type=lambda s: s.split(","), default=list(drop.SELECTORS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    queries.use(args.query_model or random_query_model(args.layers, args.kv_heads, args.head_dim))
    rows = []
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(tokens)
        shape = (args.layers, tokens, args.kv_heads, args.head_dim)
        k, v = (torch.randn(shape, generator=g).to(args.device, torch.bfloat16) for _ in range(2))
        for name in args.selectors:
            s = time_selector(name, args.ratio, k, v, args.repeats)
            rows.append({"selector": name, "tokens": tokens, "ms": s * 1e3, "ms_per_1k_tokens": s * 1e3 / tokens * 1024})
            print(f"{name:10s} {tokens:6d} tokens  {s * 1e3:8.2f} ms  {rows[-1]['ms_per_1k_tokens']:7.3f} ms/1k",
                  flush=True)
    report = {"command": " ".join(["python"] + sys.argv), "device": (torch.cuda.get_device_name() if
              args.device.startswith("cuda") else platform.processor() or "cpu"), "torch": torch.__version__,
              "query_model": args.query_model or "random (shape only)", "ratio": args.ratio,
              "layout": [args.layers, "tokens", args.kv_heads, args.head_dim], "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
