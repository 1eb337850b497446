"""The one-projection `expected` score (commit after this run) against the float32 formula it
replaced (the tests' `_expected_reference`), on random KV and a random query model of 8 layers x 4 KV
heads x 64: score differences, overlap of the kept halves, and CPU time per selection of 2,000
tokens. Run from the repository root:
python bench/results/2026-12-02-selectors/expected_projection_check.py > bench/results/2026-12-02-selectors/expected_projection_check.out
"""
import sys
import time

import torch

from evicpress_sglang.codecs import drop, queries
from evicpress_sglang.codecs.drop import ContextKV

sys.path[:0] = ["bench", "tests"]
from selector_cost import random_query_model  # noqa: E402
from test_query_selectors import _expected_reference as old_score  # noqa: E402  (the float32 formula)

L,H,d = 8, 4, 64
queries.use(random_query_model(L,H,d))
sel = drop.SELECTORS["expected"](0.5)
for dtype in (torch.float32, torch.bfloat16):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        T = 2000
        k = (torch.randn(L,T,H,d, generator=g) * (1 + 3*torch.rand(L,1,H,d, generator=g))).to(dtype)
        v = torch.randn(L,T,H,d, generator=g).to(dtype)
        kv = ContextKV(k, lambda: v, torch.arange(T), 500)
        a, b = old_score(kv), sel.score(kv)
        keep = sel.kept(T)
        ka = set(torch.topk(a, keep).indices.tolist()); kb = set(torch.topk(b, keep).indices.tolist())
        print(dtype, seed, "max |score diff|", float((a-b).abs().max()), "kept sets overlap", len(ka & kb) / keep)
t0=time.perf_counter(); [old_score(kv) for _ in range(3)]; t1=time.perf_counter(); [sel.score(kv) for _ in range(3)]; t2=time.perf_counter()
print("cpu bf16 old %.1f ms new %.1f ms" % ((t1-t0)/3e-3, (t2-t1)/3e-3))
