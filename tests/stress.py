"""A seeded, randomized scheduler for the stress suite: many requests in flight at once,
driven through the real ``EvicPressRadixCache`` over real SGLang pools exactly as SGLang's
scheduler drives a radix cache, with faults and policy switches mixed in.

Per request: ``match_prefix``; ``init_load_back`` under a temporary lock on the matched
node (as ``PrefillAdder._lock_node``); the request's own lock; prefill in chunks with
``cache_unfinished_req`` between them; decode one token at a time; ``cache_finished_req``.
Steps of different requests interleave, so locks are held across other requests'
evictions, loads and inserts. A request that finds no room is aborted the way SGLang
releases one (``cache_finished_req`` without insert).

After every step :meth:`Stress.check` asserts what must always hold; any failure is
re-raised with the seed and the tail of the operation log, so it reproduces.
"""

from __future__ import annotations

import errno
import os
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from evicpress_sglang.backend.audit import free_slots
from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.backend.guard import HOOKS
from evicpress_sglang.backend.nodes import is_placeholder
from evicpress_sglang.settings import Settings
from evicpress_sglang.tiers import disk as disk_module
from harness import LAYERS, kv_at, make_params, path_positions

REQUEST_ROWS = 16


@dataclass
class StressReq:
    """The fields of SGLang's ``Req`` the cache reads and writes."""

    origin_input_ids: array
    rid: str
    req_pool_idx: int
    extra_key: str | None = None
    output_ids: array = field(default_factory=lambda: array("q"))
    cache_protected_len: int = 0
    last_node: object = None
    priority: int = 0
    kv_committed_len: int = 0
    prefix_indices: torch.Tensor | None = None
    fill_len: int = 0

    def get_fill_ids(self):
        return (self.origin_input_ids + self.output_ids)[: self.fill_len]


@dataclass
class Job:
    req: StressReq
    logical: list[int]  # the prompt's tokens
    outputs: list[int]  # tokens it will decode
    chunk: int
    filled: int = 0  # physical slots with KV in the request's row
    decoded: int = 0
    tail: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # rest of its last page


class FaultyDisk:
    """Faults of the disk tier's files, switched on and off by the stress loop: writes that
    fail (ENOSPC, EIO) or crawl, reads that fail (EIO); files corrupted, truncated or
    removed behind the tier's back."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.write_error: int | None = None
        self.read_eio = 0.0  # probability
        self.slow_write_s = 0.0
        self.damaged: set[str] = set()  # file names the stress loop damaged

    def open(self, path, mode="r", *args, **kwargs):
        if "w" in mode:
            if self.slow_write_s:
                time.sleep(self.slow_write_s)
            if self.write_error is not None:
                raise OSError(self.write_error, os.strerror(self.write_error), str(path))
        elif self.read_eio and self.rng.random() < self.read_eio:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return open(path, mode, *args, **kwargs)

    def damage(self, root: Path, how: str) -> str | None:
        files = sorted(p for p in root.glob("*.kv"))
        if not files:
            return None
        p = self.rng.choice(files)
        try:
            data = p.read_bytes()
            if how == "corrupt" and data:
                i = self.rng.randrange(len(data))
                p.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
            elif how == "truncate":
                p.write_bytes(data[: self.rng.randrange(max(1, len(data)))])
            else:
                p.unlink()
        except FileNotFoundError:  # the tier removed it meanwhile
            return None
        self.damaged.add(p.name)
        return f"{how} {p.name}"


class Stress:
    """One seeded run. ``lossless``: every codec is exact, so every KV a request runs with
    must equal a full prefill's bit for bit; otherwise within ``lossy_bound``."""

    #: The share of prompts that leave their context partway.
    PARTWAY = 0.1

    def __init__(self, seed: int, settings: dict, tmp: Path, pool: int = 480, page_size: int = 1,
                 lossless: bool = True, lossy_bound: float = 0.45, monkeypatch=None) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.settings = settings
        self.disk_dir = Path(settings["disk_dir"]) if settings.get("disk_dir") else None
        self.pool, self.page_size = pool, page_size
        self.lossless, self.lossy_bound = lossless, lossy_bound
        self.log: list[str] = []
        self.jobs: list[Job] = []
        self.max_jobs = 6
        self.free_rows = list(range(REQUEST_ROWS))
        self.faults = FaultyDisk(self.rng)
        if monkeypatch is not None:
            monkeypatch.setattr(disk_module, "open", self.faults.open, raising=False)
        self.contexts = self._contexts()
        self.popularity = [1.0 / (rank + 1) ** 0.8 for rank in range(len(self.contexts))]  # Zipf-like reuse
        self.counts = {"stores": 0, "tier_loads": 0, "misses": 0, "host_hits": 0, "loads": 0, "aborts": 0, "restarts": 0, "switches": 0, "finished": 0, "faults": 0,
                       "plan_steps": 0, "fallback_drops": 0}
        self.stores_by_codec: Counter[str] = Counter()  # "tier:codec" -> stores, over restarts
        self.policies = self._policies()
        self.left_at = [0] * len(self.contexts)  # where the last prompt that left each context partway did
        self.hook_errors_at_start = HOOKS.internal_errors
        self.cache = self._new_cache()

    # -- set-up ----------------------------------------------------------------------

    def _new_cache(self) -> EvicPressRadixCache:
        return EvicPressRadixCache(make_params(self.pool, self.page_size, REQUEST_ROWS), Settings(**self.settings))

    def _policies(self) -> list[str]:
        s = Settings(**self.settings)
        return ["evicpress", "lru", "lru-offload", "off"] + [f"static:{c}" for c in s.stored_codecs]

    def _contexts(self) -> list[list[int]]:
        """A shared system prompt; documents under it (some under a second prompt); follow-ups
        that extend a document; and unrelated prompts. Page-aligned lengths are not forced."""
        system, other = list(range(1, 33)), list(range(40, 57))
        docs = []
        for i in range(70):
            start = 10_000 + 1000 * i
            body = list(range(start, start + self.rng.randrange(8, 90)))
            docs.append((system if i % 5 else other) + body)
        self.rng.shuffle(docs)
        contexts = list(docs)
        for _ in range(60):  # follow-up questions over a document, and chats that grow
            base = self.rng.choice(docs)
            contexts.append(base + [self.rng.randrange(500, 900) for _ in range(self.rng.randrange(3, 30))])
        for i in range(20):
            contexts.append(list(range(900_000 + 500 * i, 900_000 + 500 * i + self.rng.randrange(5, 60))))
        return contexts

    # -- the loop ----------------------------------------------------------------------

    def run(self, steps: int) -> dict:
        try:
            for step in range(steps):
                self._step(step)
                self.check()
            while self.jobs:
                self._advance(self.jobs[0])
                self.check()
            self._tally()
        except AssertionError as e:
            tail = "\n".join(self.log[-80:])
            raise AssertionError(f"stress failure (seed {self.seed}): {e}\nlast operations:\n{tail}") from e
        return self.counts

    def _step(self, step: int) -> None:
        r = self.rng.random()
        if r < 0.30 and len(self.jobs) < self.max_jobs:
            self._admit()
        elif r < 0.85 and self.jobs:
            self._advance(self.rng.choice(self.jobs))
        elif r < 0.89:
            n = self.rng.randrange(1, self.pool // 2)
            self.log.append(f"evict {n}")
            self.cache.evict(EvictParams(num_tokens=n))
        elif r < 0.90 and self.cache.planner is not None:
            # The background planner's round, stepped here (its thread also runs, kicked by
            # every eviction): a snapshot that later steps make stale, and a policy switch
            # between the snapshot and the next eviction, which must not apply the plan.
            self.log.append("plan")
            self.cache.planner.plan_once()
            if self.rng.random() < 0.3:
                name = self.rng.choice(self.policies)
                self.log.append(f"policy {name} (after the plan)")
                self.cache.set_policy(name)
        elif r < 0.91:
            name = "evicpress" if self.rng.random() < 0.4 else self.rng.choice(self.policies)
            self.log.append(f"policy {name}")
            self.cache.set_policy(name)
            self.counts["switches"] += 1
        elif r < 0.96 and self.disk_dir is not None:
            self._fault()
        elif r < 0.963:
            self._restart(kill=self.rng.random() < 0.5)
        elif self.jobs:
            self._advance(self.rng.choice(self.jobs))

    def _tally(self) -> None:
        """Add the cache's store/load counters to the run's (a restart starts new ones)."""
        st = self.cache.stats
        self.counts["stores"] += sum(st.stores.values())
        self.stores_by_codec.update(st.stores)
        self.counts["tier_loads"] += sum(st.hits.values())
        self.counts["misses"] += sum(st.misses.values())
        self.counts["plan_steps"] += st.plan["steps"]
        self.counts["fallback_drops"] += st.plan["fallback_drops"]

    def _fault(self) -> None:
        f, kind = self.faults, self.rng.choice(["enospc", "eio-write", "heal-writes", "eio-read", "heal-reads",
                                                 "slow", "fast", "corrupt", "truncate", "remove"])
        self.counts["faults"] += 1
        if kind == "enospc":
            f.write_error = errno.ENOSPC
        elif kind == "eio-write":
            f.write_error = errno.EIO
        elif kind == "heal-writes":
            f.write_error = None
        elif kind == "eio-read":
            f.read_eio = 0.1
        elif kind == "heal-reads":
            f.read_eio = 0.0
        elif kind == "slow":
            f.slow_write_s = 0.002
        elif kind == "fast":
            f.slow_write_s = 0.0
        else:
            kind = f.damage(self.disk_dir, kind) or f"{kind}: no file"
        self.log.append(f"fault {kind}")

    def _restart(self, kill: bool) -> None:
        """A new process on the same disk directory: a clean stop lets queued writes finish;
        a kill -9 loses them and may leave a half-written temporary file."""
        from evicpress_sglang.policy import Tier

        disk = self.cache.tiers.get(Tier.DISK)
        if disk is not None:
            if kill:
                with disk._changed:  # the writer thread finds nothing left to write
                    disk._pending.clear()
                disk.flush()
                (self.disk_dir / ".tmp-interrupted").write_bytes(b"EVICKV01 half a blob")
            else:
                disk.flush()
        self.log.append(f"restart ({'kill -9' if kill else 'clean'}) with {len(self.jobs)} requests in flight")
        for job in list(self.jobs):  # they die with the process
            self._done(job)
        self.counts["restarts"] += 1
        self.faults.damaged.clear()
        self._tally()
        self.cache = self._new_cache()
        self.policies = self._policies()

    # -- one request's life --------------------------------------------------------------

    def _admit(self, logical: list[int] | None = None, extra: str | None = None) -> Job:
        """A new request: a random user prompt, or ``logical`` in cache namespace ``extra``."""
        if logical is None:
            i = self.rng.choices(range(len(self.contexts)), self.popularity)[0]
            logical = list(self.contexts[i])
            if self.rng.random() < self.PARTWAY and self.left_at[i] < len(logical) - 1:
                # leaves it partway, each time a little further in (a shared title, then a chat's
                # first words, ...): a cached node split once is left again inside what it kept
                self.left_at[i] = min(self.left_at[i] + self.rng.randrange(1, 6), len(logical) - 1)
                logical = logical[: self.left_at[i]] + [self.rng.randrange(400, 500)]
            elif self.rng.random() < 0.5:  # a question after the context
                logical += [self.rng.randrange(100, 400) for _ in range(self.rng.randrange(1, 12))]
            extra = "tenant-b" if self.rng.random() < 0.1 else None
        req = StressReq(array("q", logical), rid=f"s{len(self.log)}", req_pool_idx=self.free_rows.pop(), extra_key=extra)
        job = Job(req, logical, [self.rng.randrange(600, 700) for _ in range(self.rng.randrange(1, 6))],
                  chunk=self.rng.choice([7, 16, 64, 10_000]))
        c = self.cache
        m = c.match_prefix(MatchPrefixParams(key=RadixKey(array("q", logical), extra), req=req))
        prefix, req.last_node = m.device_indices, m.last_device_node
        self.log.append(f"admit {req.rid} row {req.req_pool_idx}: {len(logical)} tokens, gpu hit {len(prefix)}, "
                        f"host hit {m.host_hit_length}, chunk {job.chunk}")
        self.counts["host_hits"] += int(m.host_hit_length > 0)
        if m.host_hit_length > 0 and self.rng.random() < 0.9:
            anchor = req.last_node
            c.inc_lock_ref(anchor)
            try:
                new, req.last_node = c.init_load_back(InitLoadBackParams(
                    best_match_node=m.best_match_node, host_hit_length=m.host_hit_length, req=req))
            finally:
                c.dec_lock_ref(anchor)
            prefix = torch.cat([prefix, new])
            self.counts["loads"] += int(len(new) > 0)
            self.log.append(f"  loaded {len(new)} slots")
        c.inc_lock_ref(req.last_node)
        req.prefix_indices = prefix
        req.cache_protected_len = job.filled = len(prefix)
        c.req_to_token_pool.req_to_token[req.req_pool_idx, : len(prefix)] = prefix.to(torch.int32)
        self.jobs.append(job)
        self._check_row(job, "after the match and load-back")
        return job

    def _physical(self, job: Job) -> int:
        return len(job.req.origin_input_ids)

    def _offset(self, job: Job) -> int:
        return getattr(job.req, "evp_pos_offset", 0)

    def _allocate(self, job: Job, n: int) -> torch.Tensor | None:
        """``n`` slots for the request's next tokens: first the rest of its last page (a
        paged pool keeps a page's tokens consecutive in the row), then whole new pages,
        evicting if the pool is short, as the scheduler does."""
        c = self.cache
        alloc = c.token_to_kv_pool_allocator
        need = n - len(job.tail)
        fresh = torch.empty(0, dtype=torch.int64)
        if need > 0:
            need = -(-need // self.page_size) * self.page_size
            if need > alloc.available_size():
                c.evict(EvictParams(num_tokens=need - alloc.available_size()))
            if need > alloc.available_size():
                return None
            fresh = alloc.alloc(need).to(torch.int64)
        slots = torch.cat([job.tail, fresh])
        job.tail = slots[n:]
        return slots[:n]

    def _advance(self, job: Job) -> None:
        req, c = job.req, self.cache
        physical = self._physical(job)
        if job.filled < physical:  # one prefill chunk
            n = min(job.chunk, physical - job.filled)
            if self.page_size > 1 and job.filled + n < physical:
                n = max(self.page_size, n - (job.filled + n) % self.page_size)  # chunks end on page boundaries
                n = min(n, physical - job.filled)
            slots = self._allocate(job, n)
            if slots is None:
                return self._wait_or_abort(job)
            self._compute(job, slots)
            if job.filled < physical:
                req.fill_len = job.filled
                self.log.append(f"chunk {req.rid}: {job.filled}/{physical}")
                c.cache_unfinished_req(req, chunked=True)
                self._check_row(job, "after cache_unfinished_req")
            return None
        if job.decoded < len(job.outputs) - 1:  # one decode step: the last token's KV is never computed
            slots = self._allocate(job, 1)
            if slots is None:
                return self._wait_or_abort(job)
            req.output_ids.append(job.outputs[job.decoded])
            job.decoded += 1
            self._compute(job, slots[:1])
            return None
        req.output_ids.append(job.outputs[job.decoded])
        self._check_row(job, "before cache_finished_req")
        self.log.append(f"finish {req.rid}: {job.filled} slots")
        c.cache_finished_req(req, kv_len_to_handle=job.filled)
        self._done(job)
        self.counts["finished"] += 1
        return None

    def _compute(self, job: Job, slots: torch.Tensor) -> None:
        """Write the KV a model computes for the next ``len(slots)`` tokens of the row."""
        req, pool = job.req, self.cache.kvpool
        logical = job.logical + list(req.output_ids)
        start = job.filled + self._offset(job)  # logical position of the first new token
        span = range(start, start + len(slots))
        k, v = kv_at([logical[p] for p in span], span)
        for layer in range(LAYERS):
            pool.k_buffer[layer][slots] = k[layer]
            pool.v_buffer[layer][slots] = v[layer]
        rtt = self.cache.req_to_token_pool.req_to_token
        rtt[req.req_pool_idx, job.filled: job.filled + len(slots)] = slots.to(torch.int32)
        job.filled += len(slots)
        req.kv_committed_len = job.filled

    def _wait_or_abort(self, job: Job) -> None:
        """No room: wait for others to finish, or give up as SGLang retracts a request."""
        if len(self.jobs) > 1 and self.rng.random() < 0.7:
            self.log.append(f"wait {job.req.rid}: no room")
            return
        self._abort(job)

    def _abort(self, job: Job) -> None:
        self.log.append(f"abort {job.req.rid}: no room")
        self.cache.cache_finished_req(job.req, is_insert=False, kv_len_to_handle=job.filled)
        self._done(job)
        self.counts["aborts"] += 1

    def _done(self, job: Job) -> None:
        self.jobs.remove(job)
        self.free_rows.append(job.req.req_pool_idx)

    # -- checks ------------------------------------------------------------------------------

    def _check_row(self, job: Job, when: str) -> None:
        """The KV the request runs with is what a full prefill computes: bit for bit when
        lossless, within the bound otherwise; a token-dropped prefix keeps its positions."""
        req, c = job.req, self.cache
        n = job.filled
        if n == 0:
            return
        slots = c.req_to_token_pool.req_to_token[req.req_pool_idx, :n].to(torch.int64)
        cached = c._path(req.last_node)
        tree_slots = sum(len(x.value) for x in cached)
        positions = path_positions(c, req.last_node)
        offset = self._offset(job)
        positions = torch.cat([positions, torch.arange(tree_slots + offset, n + offset)])[:n]
        assert positions.numel() == n and bool((positions[1:] > positions[:-1]).all()), f"{req.rid} {when}: positions"
        logical = job.logical + list(req.output_ids)
        want_k, want_v = kv_at([logical[p] for p in positions.tolist()], positions.tolist())
        got_k = torch.stack([c.kvpool.k_buffer[layer][slots] for layer in range(LAYERS)])
        got_v = torch.stack([c.kvpool.v_buffer[layer][slots] for layer in range(LAYERS)])
        if self.lossless:
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), f"{req.rid} {when}: KV not exact"
        else:
            for got, want in ((got_k, want_k), (got_v, want_v)):
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                assert err < self.lossy_bound, f"{req.rid} {when}: KV error {err:.3f}"

    def check(self) -> None:
        c = self.cache
        assert c.health.internal_errors == 0, f"internal error: {c.health.last_error}"
        assert HOOKS.internal_errors == self.hook_errors_at_start, f"hook error: {HOOKS.last_error}"
        assert c.health.degraded is None, c.health.degraded
        assert c.planner is None or not c.planner.failed, "the background planner failed"
        problems = c.audit()
        assert not problems, problems
        # Every pool page is free, held by the tree, or held by exactly one running request.
        alloc = c.token_to_kv_pool_allocator
        ps = self.page_size
        tree = c.all_values_flatten().to(torch.int64)
        parts = [torch.unique(tree // ps), torch.unique(free_slots(alloc) // ps)]
        for job in self.jobs:
            row = c.req_to_token_pool.req_to_token[job.req.req_pool_idx, job.req.cache_protected_len: job.filled]
            parts.append(torch.unique(torch.cat([row.to(torch.int64), job.tail]) // ps))
        every = torch.cat(parts)
        owned = torch.unique(every)
        pages = alloc.size // ps
        assert owned.numel() == every.numel(), "a page is owned twice (tree, free list, running requests)"
        assert torch.equal(owned, torch.arange(1, pages + 1)), \
            f"pages leaked: {pages - owned.numel()} of {pages} unaccounted"
        # Every placeholder holds its blob, unless the test damaged its file or its background
        # write failed since the cache last looked (the next entry point removes it).
        for node in list(c.nodes.values()):
            if is_placeholder(node):
                tier, key = c.tiers[node.evp.tier], node.evp.blob
                if tier.contains(key):
                    continue
                # Read after contains(): a failed write is in _lost by the time its entry is gone.
                excused = key in getattr(tier, "_lost", ()) or (
                    hasattr(tier, "_path_for") and tier._path_for(key).name in self.faults.damaged)
                assert excused, f"placeholder {node.id} lost its blob"
