"""Drive an SGLang radix cache the way the scheduler does, on CPU, with real SGLang pools.

Each ``serve`` call is one request: match its prefix, load back what is in lower tiers,
allocate and "compute" the rest (KV is a deterministic function of the token and its
position, so any reuse can be checked), cache it when finished, release its locks.
"""

from __future__ import annotations

import itertools
import time
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from sglang.srt.managers.io_struct import GetInternalStateReqOutput, SetInternalStateReqOutput
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from evicpress_sglang import plugin

LAYERS, HEADS, DIM = 4, 2, 64
DEVICE = "cpu"  # bench/cuda_exactness.py runs the same scenario with pools on "cuda"
_rids = itertools.count()


def make_params(pool_tokens: int, page_size: int = 1, requests: int = 8) -> CacheInitParams:
    pool = MHATokenToKVPool(size=pool_tokens, page_size=page_size, dtype=torch.bfloat16, head_num=HEADS,
                            head_dim=DIM, layer_num=LAYERS, device=DEVICE, enable_memory_saver=False)
    if page_size == 1:
        alloc = TokenToKVPoolAllocator(pool_tokens, torch.bfloat16, DEVICE, pool, need_sort=False)
    else:
        alloc = PagedTokenToKVPoolAllocator(pool_tokens, page_size, torch.bfloat16, DEVICE, pool, need_sort=False)
    rtp = ReqToTokenPool(size=requests, max_context_len=4096, device=DEVICE, enable_memory_saver=False)
    return CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=alloc,
                           page_size=page_size)


def expected_kv(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV a model would compute: [layers, n, heads, dim], smooth like real KV."""
    return kv_at(tokens, range(len(tokens)))


def kv_at(tokens, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV of token ``tokens[i]`` at position ``positions[i]``, as :func:`expected_kv` has it."""
    t = torch.as_tensor(list(tokens), dtype=torch.float32)[None, :, None, None]
    pos = torch.as_tensor(list(positions), dtype=torch.float32)[None, :, None, None]
    layer = torch.arange(LAYERS, dtype=torch.float32)[:, None, None, None]
    head = torch.arange(HEADS, dtype=torch.float32)[None, None, :, None]
    d = torch.arange(DIM, dtype=torch.float32)[None, None, None, :]
    k = torch.sin(0.37 * t + 0.11 * d + 0.5 * layer + head) * (1 + 0.01 * pos % 3)
    v = torch.cos(0.23 * t - 0.07 * d + 0.3 * layer - head)
    return k.bfloat16(), v.bfloat16()


@dataclass
class FakeReq:
    origin_input_ids: array
    rid: str = field(default_factory=lambda: f"r{next(_rids)}")
    output_ids: array = field(default_factory=lambda: array("q"))
    extra_key: str | None = None
    req_pool_idx: int = 0
    cache_protected_len: int = 0
    last_node: object = None
    priority: int = 0
    kv_committed_len: int = 0


@dataclass
class Served:
    reused: int  # slots taken from the cache (GPU + loaded back)
    loaded: int  # of which loaded back from host/disk
    k: torch.Tensor  # the KV the request ran with, one entry per slot
    v: torch.Tensor
    offset: int = 0  # tokens of its prefix that had no slot (token-dropped contexts)
    positions: torch.Tensor | None = None  # the position each slot's KV belongs to


def serve(cache, tokens: list[int], extra_key: str | None = None, load_back: bool = True, between=None,
          last_recomputed: bool = False) -> Served:
    """``load_back=False``: the scheduler skipped the load (no room yet), so the request
    recomputes the host/disk part itself. A request continuing a token-dropped context
    computes its new tokens at positions shifted by the cache's offset, as the
    ``ForwardBatch.init_new`` hook makes the model do. ``last_recomputed``: match at most all
    tokens but the last, as SGLang's scheduler does (``RadixKey.limit``)."""
    req = FakeReq(array("q", tokens), extra_key=extra_key)
    arrive(cache, req)
    limit = len(tokens) - 1 if last_recomputed else None
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), extra_key, limit=limit), req=req))
    prefix, last = m.device_indices, m.last_device_node
    req.last_node = last  # as SGLang's match sets it
    if between is not None:  # other requests run between the match and the load-back
        between()
    loaded = 0
    if m.host_hit_length > 0 and load_back:
        cache.inc_lock_ref(last)
        new, new_last = cache.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                                host_hit_length=m.host_hit_length, req=req))
        cache.dec_lock_ref(last)
        prefix, last, loaded = torch.cat([prefix, new]), new_last, len(new)
    cache.inc_lock_ref(last)
    req.last_node = last
    offset = getattr(req, "evp_pos_offset", 0)
    physical = len(req.origin_input_ids)
    assert physical == len(tokens) - offset
    need = physical - len(prefix)
    alloc = cache.token_to_kv_pool_allocator
    if need > alloc.available_size():
        cache.evict(EvictParams(num_tokens=need - alloc.available_size()))
    slots = alloc.alloc(need) if need else torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert slots is not None, "pool exhausted"
    pool = alloc.get_kvcache()
    k, v = (t.to(DEVICE) for t in expected_kv(tokens))
    for layer in range(LAYERS):  # "compute" the new tokens at their logical positions
        pool.k_buffer[layer][slots] = k[layer, len(prefix) + offset:]
        pool.v_buffer[layer][slots] = v[layer, len(prefix) + offset:]
    indices = torch.cat([prefix, slots]).to(torch.int64)
    used_k = torch.stack([pool.k_buffer[layer][indices] for layer in range(LAYERS)])
    used_v = torch.stack([pool.v_buffer[layer][indices] for layer in range(LAYERS)])
    positions = torch.cat([path_positions(cache, last), torch.arange(len(prefix) + offset, len(tokens))])
    cache.req_to_token_pool.req_to_token[req.req_pool_idx, :physical] = indices.to(torch.int32)
    req.cache_protected_len = len(prefix)
    req.kv_committed_len = physical
    cache.cache_finished_req(req, kv_len_to_handle=physical)
    return Served(len(prefix), loaded, used_k, used_v, offset, positions)


def arrive(cache, req, timeout_s: float = 30.0) -> None:
    """What the plugin's scheduler hooks do for a new request: start its remote reads, then
    keep it out of prefill while the cache holds it (at most ``timeout_s``: a test's bound)."""
    cache.prefetch_for(req)
    deadline = time.monotonic() + timeout_s
    while cache.held_for_prefetch([req.rid]) and time.monotonic() < deadline:
        time.sleep(0.001)


def pool_with_kv(tokens: int = 100):
    """A real SGLang pool on the CPU filled with random KV, and ``tokens`` scattered slots of it
    (by default more than a dropping codec's ``MIN_TOKENS``, so that it drops some)."""
    pool = make_params(256).token_to_kv_pool_allocator.get_kvcache()
    g = torch.Generator().manual_seed(1)
    for buf in (*pool.k_buffer, *pool.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=g))
    return pool, torch.randperm(256, generator=g)[:tokens]


def assert_pool_entry_points_agree(name: str) -> None:
    """For codec ``name``: ``kv_io.encode_from_pool`` makes the blob gather + encode makes, byte
    for byte, and ``decode_into_pool`` writes into scattered slots what ``decode`` returns."""
    from evicpress_sglang.backend import kv_io
    from evicpress_sglang.codecs import get_codec

    pool, slots = pool_with_kv()
    codec = get_codec(name)
    enc = kv_io.encode_from_pool(pool, slots, codec)
    assert torch.equal(enc.payload, codec.device_codec.encode(*kv_io.gather(pool, slots)).payload)
    n = codec.output_shape(enc.shape).tokens
    into = slots[:n].flip(0)
    positions = kv_io.decode_into_pool(pool, into, codec, enc)
    k, v, want_positions = kv_io.decode(codec.device_codec, enc, "cpu")
    got_k, got_v = kv_io.gather(pool, into)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert (positions is None) == (want_positions is None)
    assert positions is None or torch.equal(positions, want_positions)


def until(cond, timeout: float = 10.0) -> None:
    """Wait for ``cond()`` to hold (background threads at work); fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cond()


def path_positions(cache, node) -> torch.Tensor:
    """The position of each slot on the path from the root to ``node``."""
    parts, start = [], 0
    path = []
    while node is not cache.root_node:
        path.append(node)
        node = node.parent
    for n in reversed(path):
        kept = getattr(n, "evp_kept", None)
        parts.append(start + (kept.cpu() if kept is not None else torch.arange(len(n.value))))
        start += len(n.key)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def free_slots_accounted(cache) -> bool:
    """SGLang's idle check: every pool slot is free or held by the tree."""
    alloc = cache.token_to_kv_pool_allocator
    return alloc.available_size() + cache.evictable_size() + cache.protected_size() == alloc.size


class FakeScheduler:
    """The two Scheduler methods the plugin hooks, wrapped exactly as HookRegistry does (admin tests)."""

    def __init__(self, cache):
        self.tree_cache = cache
        self.other_updates = []
        self.waiting_queue = []

    def _get(self, req):
        return GetInternalStateReqOutput(internal_state={"model": "x"})

    def _set(self, req):
        self.other_updates.append(dict(req.server_args))
        return SetInternalStateReqOutput(updated=True)

    def get_internal_state(self, req):
        return plugin._add_status(self._get(req), self, req)

    def set_internal_state(self, req):
        return plugin._set_state(FakeScheduler._set, self, req)


class FakeTokenizerManager:
    def __init__(self, scheduler, **server_args):
        self.scheduler = scheduler
        self.server_args = SimpleNamespace(api_key=None, admin_api_key=None) if not server_args else \
            SimpleNamespace(**({"api_key": None, "admin_api_key": None} | server_args))

    async def get_internal_state(self):
        return [self.scheduler.get_internal_state(None).internal_state]

    async def set_internal_state(self, obj):
        return [self.scheduler.set_internal_state(obj).updated]


def load_bench_script(name: str):
    """``bench/<name>.py`` as a module (bench/ is not a package), registered under ``name``: its
    dataclasses look their module up in ``sys.modules``."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
