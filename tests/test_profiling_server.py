"""The quality profiler end to end on CPU: the real profiler loop, over the real admin
routes and scheduler hooks, against a real evicpress cache with SGLang pools. Only the
model is a stand-in: its answer is a function of the KV each request was served with
(through the cache), so a degraded copy of a context answers differently."""

import json
import threading
from array import array

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from evicpress_sglang.admin import add_routes
from evicpress_sglang.backend.cache import EvicPressRadixCache
from evicpress_sglang.backend.profile_budget import BANK_S, ProfileBudget
from evicpress_sglang.backend.profile_job import NAMESPACE, parse_namespace
from evicpress_sglang.policy.contexts import prior_quality
from evicpress_sglang.profiler.client import RID_PREFIX, ServerClient
from evicpress_sglang.profiler.runner import Profiler, ask_together
from evicpress_sglang.settings import ENV, load_settings
from harness import FakeScheduler, FakeTokenizerManager, free_slots_accounted, make_params, serve

DOC = list(range(1000, 1160))  # a 160-token context
ANSWER_TOKENS = 8


def model_answer(k: torch.Tensor) -> list[int]:
    """The stand-in model: token j is a rounded mean of one key channel over every slot it
    attends to, so it moves with quantization error and with dropped tokens."""
    layers = k.shape[0]
    return [int(torch.round(k[j % layers, :, 0, j].float().mean() * 32)) % 1000 for j in range(ANSWER_TOKENS)]


class OneAtATime:
    """A test client that serves one ``/generate`` at a time, as SGLang's single scheduler
    thread does: the profiler asks a variant's queries from several threads at once, and the
    TestClient would otherwise run each on its own event loop, touching the cache together.
    (Only those: the admin trigger's route waits for the profiler's own nested requests.)"""

    def __init__(self, inner) -> None:
        self.inner, self.lock = inner, threading.Lock()

    def get(self, *args, **kwargs):
        return self.inner.get(*args, **kwargs)

    def post(self, url, **kwargs):
        if not url.endswith("/generate"):
            return self.inner.post(url, **kwargs)
        with self.lock:
            self.before_generate()
            return self.inner.post(url, **kwargs)

    def before_generate(self) -> None:
        """What runs in the scheduler just before each ``/generate`` (subclasses: user traffic)."""


def make_app(cache, scheduler):
    tm = FakeTokenizerManager(scheduler)
    app = FastAPI()
    state = {}

    async def generate(request: Request):
        body = await request.json()
        ids = body["input_ids"]
        if body.get("return_logprob"):  # teacher-forced: the model's choice at every position from the start
            start = body["logprob_start_len"]
            top = model_answer(serve(cache, ids[:start + 1], body.get("extra_key")).k)
            n = len(ids) - start - 1
            entries = [[0.0 if ids[start + 1 + j] == top[j] else -2.0, ids[start + 1 + j], None] for j in range(n)]
            return {"text": "", "output_ids": [0], "meta_info": {
                "input_token_logprobs": [[None, ids[start], None]] + entries,
                "input_top_logprobs": [None] + [[[0.0, top[j], None]] for j in range(n)]}}
        out = model_answer(serve(cache, ids, body.get("extra_key")).k)
        state.setdefault("namespaces", []).append(body.get("extra_key"))
        return {"text": " ".join(f"t{t}" for t in out), "output_ids": out, "meta_info": {}}

    async def tokenize(request: Request):
        body = await request.json()
        return {"tokens": [2000 + ord(c) % 500 for c in body["prompt"]], "count": len(body["prompt"])}

    app.add_api_route("/generate", generate, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    holder = {}
    add_routes(app, lambda: tm, lambda: holder["profiler"])
    http = OneAtATime(TestClient(app))
    profiler = Profiler(ServerClient("http://testserver", http=http), answer_tokens=ANSWER_TOKENS, poll_s=0.0)
    holder["profiler"] = profiler
    return http, profiler, state


@pytest.fixture
def server(tmp_path, monkeypatch):
    settings = {"host_bytes": "4MiB", "host_codecs": ["bf16", "int8", "int2", "keydiff:0.5"],
                "profile_min_tokens": 32, "profile_reserve": 0.5}
    monkeypatch.setenv(ENV, json.dumps(settings))
    cache = EvicPressRadixCache(make_params(1024), load_settings())
    scheduler = FakeScheduler(cache)
    http, profiler, state = make_app(cache, scheduler)
    return cache, scheduler, http, profiler, state


def ask(cache, doc, question):
    return serve(cache, doc + [7, 8, 9] + question)


def _find(cache, tokens):
    return cache._find_exact(RadixKey(array("q", tokens)))


def profile_namespaces(cache):
    return [c for c in cache.root_node.children.values() if parse_namespace(c.key.extra_key) is not None]


def test_a_reused_context_is_profiled_through_degraded_copies_served_by_the_cache(server):
    cache, _, _, profiler, state = server
    for q in ([1, 2, 3], [4, 5, 6], [11, 12]):  # the context is reused: its queries are held out
        ask(cache, DOC, q)
    node = _find(cache, DOC + [7, 8, 9])
    assert node is not None and len(cache.queries.queries(node.id)) == 2
    t = cache.table
    row = t.row_of[node.id]
    freq, n_rows, queries = float(t.freq[row]), len(t), cache.queries.queries(node.id)

    assert profiler.step() is True
    rec = cache.profiling.records[node.id]
    assert set(rec.quality) == {"int8", "int2", "keydiff:0.5"}
    assert rec.quality["int2"] < 1.0 and rec.quality["int2"] <= rec.quality["int8"]
    for codec, q in rec.quality.items():  # the policy now plans with the measurement
        cols = [j for j, c in enumerate(t.configs) if c.codec == codec]
        assert all(t.quality[row, j] == q for j in cols)
    # every profile request ran in a profile namespace, each variant was really served
    assert state["namespaces"] and all(ns.startswith(NAMESPACE) for ns in state["namespaces"])
    assert cache.profiling.counts["staged"] >= 4 and cache.profiling.counts["variants_tainted"] == 0
    # ... and left no trace: no copies, no table rows, no hits, no held-out queries, no leaked slots
    assert profile_namespaces(cache) == [] and cache.profiling.held_tokens() == 0
    assert len(t) == n_rows and float(t.freq[row]) == freq and cache.queries.queries(node.id) == queries
    assert free_slots_accounted(cache)
    assert profiler.step() is False  # profiled with every query it has: nothing to do


def test_scores_are_exact_for_a_lossless_variant_and_drop_for_a_lossy_one(server):
    cache, _, http, profiler, _ = server
    for q in ([1, 2, 3], [4, 5, 6], [11, 12]):
        ask(cache, DOC, q)
    job = ServerClient("http://testserver", http=http).jobs(want=1)["jobs"][0]
    job["codecs"].append("bf16")  # an extra lossless variant: must score 1.0 on every score
    job["namespaces"].append(job["namespaces"][0].rsplit(":", 1)[0] + f":{len(job['codecs']) - 1}")
    cache.profiling.jobs[job["job"]].codecs.append("bf16")
    scores = profiler.measure(job, scores=("top1", "likelihood", "f1"))
    exact = scores[len(job["codecs"]) - 1]
    assert exact == {"top1": 1.0, "likelihood": 1.0, "f1": 1.0}
    int2 = scores[job["codecs"].index("int2")]
    assert all(0.0 <= v < 1.0 for v in int2.values()), int2


def test_measured_qualities_become_the_prior_of_unprofiled_contexts(server):
    cache, _, _, profiler, _ = server
    other = list(range(3000, 3100))
    ask(cache, other, [1])  # cached, never reused: no held-out query, not profiled
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    profiler.step()
    measured = cache.profiling.records[_find(cache, DOC + [7, 8, 9]).id].quality["int2"]
    t = cache.table
    row = t.row_of[_find(cache, other + [7, 8, 9, 1]).id]
    col = next(j for j, c in enumerate(t.configs) if c.codec == "int2")
    want = (measured + 2.0 * prior_quality("int2")) / 3.0
    assert t.quality[row, col] == pytest.approx(want) and t.prior("int2") == pytest.approx(want)


def test_jobs_only_while_nothing_waits_and_again_when_new_queries_arrive(server):
    cache, scheduler, _, profiler, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    scheduler.waiting_queue = ["a user request"]
    assert profiler.step() is False and not cache.profiling.jobs
    scheduler.waiting_queue = []
    assert profiler.step() is True
    assert profiler.step() is False
    ask(cache, DOC, [21, 22])  # a new query: the estimate is now uncertain
    assert profiler.step() is True
    cache.settings.profile_max_age_s = 1e-9  # and an old estimate is redone
    assert profiler.step() is True


def test_contexts_never_profiled_come_before_popular_ones_profiled_again(server):
    cache, _, _, profiler, _ = server
    other = list(range(3000, 3100))
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    assert profiler.step() is True  # DOC profiled
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, other, q)
    for q in ([21, 22], [23, 24], [25, 26]):  # DOC: more popular, and it has new queries
        ask(cache, DOC, q)
    cache.profiling.prepare(1)
    (job,) = cache.profiling.jobs.values()
    assert job.node == _find(cache, other + [7, 8, 9]).id
    cache.profiling.report(job.id, {}, 0)
    ask(cache, DOC + [7, 8, 9, 4], [40])  # a node of 1 token of its own below DOC, reused: DOC's question
    short, doc = _find(cache, DOC + [7, 8, 9, 4]), _find(cache, DOC + [7, 8, 9])
    assert len(short.key) == 1 and cache.queries.queries(short.id) == []
    assert [4, 7, 8, 9, 40] in [q.tolist() for q in cache.queries.queries(doc.id)]
    ask(cache, other, [50])  # a new query: `other` is due to be profiled again...
    cache.settings.profile_min_tokens = len(other) + 4  # ...but is now too short, though it holds queries
    cache.profiling.prepare(5)
    assert {j.node for j in cache.profiling.jobs.values()} == {doc.id}


def test_short_contexts_are_not_refusals_with_self_written_questions_either(server):
    cache, _, _, _, _ = server
    cache.settings.profile_self_questions = 2
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    ask(cache, DOC + [7, 8, 9, 4], [40])  # a node of 1 token of its own, reused
    cache.profiling.prepare(10)
    refusal = cache.profiling.last_refusal
    assert refusal is None or "fewer than profile_min_tokens" not in refusal["reason"], refusal
    for job in list(cache.profiling.jobs.values()):
        cache.profiling.report(job.id, {}, 0)


def test_a_profile_request_of_an_unknown_variant_is_ignored(server):
    cache, _, http, _, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    job = ServerClient("http://testserver", http=http).jobs(want=1)["jobs"][0]
    serve(cache, job["prefix"][:10] + [5], extra_key=f"{NAMESPACE}{job['job']}:99")  # partly matched, no variant 99
    assert cache.health.internal_errors == 0 and cache.profiling.jobs[job["job"]].tainted() == set()
    cache.profiling.report(job["job"], {}, 0)


def test_no_background_profiling_under_a_policy_that_ignores_quality(server):
    cache, _, http, profiler, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    for name in ("lru-offload", "static:int8", "off"):
        cache.set_policy(name)
        assert profiler.step() is False and not cache.profiling.jobs
    r = http.post("/evicpress/profile", json={"node": _find(cache, DOC + [7, 8, 9]).id})  # asked for: still done
    assert r.status_code == 200 and r.json()["measured"], r.text
    cache.set_policy("evicpress")
    cache.settings.profile_max_age_s = 1e-9
    assert profiler.step() is True


def test_a_variant_served_without_its_copy_is_discarded_and_status_says_why(server):
    cache, _, http, profiler, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    node = _find(cache, DOC + [7, 8, 9])
    row = cache.table.row_of[node.id]
    before = cache.table.quality[row].copy()
    job = ServerClient("http://testserver", http=http).jobs(want=1)["jobs"][0]
    cache.settings.profile_reserve = 0.0  # no copy can be staged now
    result = profiler.profile(job)
    assert result["measured"] == {} and set(result["discarded"]) == {"int8", "int2", "keydiff:0.5"}
    assert cache.profiling.counts["variants_tainted"] == 3
    why = http.get("/evicpress/status").json()["profiler"]["outcomes"][str(job["job"])]["reason"]
    assert why.startswith(f"variant 3 (keydiff:0.5) partly matched: 0 of {len(job['prefix'])} tokens") \
        and "staging refused: the profiling reserve is full" in why, why
    assert profile_namespaces(cache) == [] and free_slots_accounted(cache) and cache.protected_size() == 0
    assert (cache.table.quality[row] == before).all()


def test_a_variant_staged_after_a_tainted_request_replaces_its_leftovers(server):
    """A request served without its copy leaves its whole prompt in the namespace; a later
    request of the same variant must not stage the copy over it (an orphan node that the
    stock LRU path later tripped over: a scheduler crash on the H100)."""
    cache, _, http, _, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    job = ServerClient("http://testserver", http=http).jobs(want=1)["jobs"][0]
    ns = job["namespaces"][0]
    cache.settings.profile_reserve = 0.0
    serve(cache, job["prefix"] + [5, 6], extra_key=ns)  # tainted; its prompt stays in the namespace
    cache.settings.profile_reserve = 0.5
    serve(cache, job["prefix"] + [8], extra_key=ns)  # now the copy is staged
    assert cache.profiling.counts["staged"] == 1
    tops = [c for c in profile_namespaces(cache) if c.key.extra_key == ns]
    assert len(tops) == 1 and len(tops[0].key) <= len(job["prefix"])
    cache.set_policy("off")  # stock LRU walks every leaf, the namespace's included; the job's copy is locked
    cache.evict(EvictParams(num_tokens=10_000))
    assert [c.key.extra_key for c in profile_namespaces(cache)] == [ns]
    cache.profiling.report(job["job"], {}, 0)
    cache.evict(EvictParams(num_tokens=10_000))
    assert profile_namespaces(cache) == [] and free_slots_accounted(cache) and cache.protected_size() == 0


def test_user_evictions_take_idle_profile_nodes_first_but_not_the_copy_being_asked(server):
    cache, _, http, _, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    job = ServerClient("http://testserver", http=http).jobs(want=1)["jobs"][0]
    serve(cache, job["prefix"] + [5, 6], extra_key=job["namespaces"][2])  # stages the int2 copy; [5, 6] idle below it
    copy = next(c for c in profile_namespaces(cache))
    held = cache.profiling.held_tokens()
    assert copy.lock_ref == 1 and held == len(copy.value) + 2
    user_nodes = len(cache.table)
    assert cache.evict(EvictParams(num_tokens=2)).num_tokens_evicted == 2
    assert cache.profiling.held_tokens() == len(copy.value) and not copy.children  # the idle request's tokens went
    assert len(cache.table) == user_nodes and _find(cache, DOC + [7, 8, 9]).value is not None
    cache.evict(EvictParams(num_tokens=10_000))  # everything else goes; the copy and the pinned context stay
    assert cache.profiling.held_tokens() == len(copy.value) and cache.nodes[job["node"]].value is not None
    cache.profiling.report(job["job"], {}, 0)
    assert cache.profiling.held_tokens() == 0 and cache.protected_size() == 0 and free_slots_accounted(cache)


def test_admin_trigger_profiles_one_context_or_says_why_not(server):
    cache, _, http, _, _ = server
    lonely = list(range(5000, 5100))
    ask(cache, lonely, [1])
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    node = _find(cache, DOC + [7, 8, 9]).id
    r = http.post("/evicpress/profile", json={"node": node})
    assert r.status_code == 200, r.text
    assert set(r.json()["measured"]) == {"int8", "int2", "keydiff:0.5"}
    status = http.get("/evicpress/status").json()
    assert status["profiler"]["profiled_contexts"] == 1
    assert any(p["node"] == node and p["profiled_quality"] for p in status["placements"])
    no_queries = _find(cache, lonely + [7, 8, 9, 1]).id
    r = http.post("/evicpress/profile", json={"node": no_queries})
    assert r.status_code == 409 and "no held-out queries" in r.json()["error"]
    r = http.post("/evicpress/profile", json={"node": 999_999})
    assert r.status_code == 409 and "no such context" in r.json()["error"]


@pytest.mark.parametrize("path, body, message", [
    ("/evicpress/profile", {"nod": 3}, "node"),
    ("/evicpress/profile", {"node": -1}, "whole number"),
    ("/evicpress/profile/jobs", {"want": 0}, "want"),
    ("/evicpress/profile/jobs", {"want": 1, "node": 2}, "want"),
    ("/evicpress/profile/report", {"job": 1, "queries": 1, "quality": {"0": 0.5}}, "lossy variant"),
    ("/evicpress/profile/report", {"job": 1, "queries": 1, "quality": {"1": 1.5}}, "[0, 1]"),
    ("/evicpress/profile/report", {"job": 1, "quality": {}}, "exactly"),
])
def test_malformed_profiler_requests_are_400(server, path, body, message):
    cache, _, http, _, _ = server
    r = http.post(path, json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert not cache.profiling.jobs and not cache.profiling.records


def test_a_report_for_an_unknown_job_is_refused(server):
    _, _, http, _, _ = server
    r = http.post("/evicpress/profile/report", json={"job": 77, "queries": 1, "quality": {"1": 0.5}})
    assert r.status_code == 409


def test_an_unknown_score_is_refused():
    with pytest.raises(ValueError, match="valid"):
        Profiler(ServerClient("http://unused"), score="bleu")


def test_the_budget_keeps_the_profilers_gpu_time_within_its_share():
    clock = [0.0]
    share = [0.05]
    budget = ProfileBudget(lambda: share[0], lambda: True, clock=lambda: clock[0])
    assert budget.balance_s == pytest.approx(0.05 * BANK_S)  # a new server may profile at once
    budget.charge(0.05 * BANK_S + 1.0)  # spent, and 1 s over
    assert not budget.allows_job() and budget.refused == 1
    clock[0] = 19.0  # 19 s at 5% = 0.95 s: still short
    assert not budget.allows_job()
    clock[0] = 21.0
    assert budget.allows_job()
    clock[0] = 1e6  # a quiet day banks at most BANK_S of share
    assert budget.allows_job() and budget.balance_s == pytest.approx(0.05 * BANK_S)
    share[0] = 0.0  # switched off at runtime: what is banked is used, nothing more accrues
    budget.charge(0.05 * BANK_S)
    clock[0] = 2e6
    assert not budget.allows_job()
    assert budget.status() == {"share": 0.0, "charged_s": pytest.approx(0.05 * BANK_S * 2 + 1.0),
                               "balance_s": 0.0, "refused_jobs": 3}


@pytest.mark.parametrize("seed", range(3))
def test_over_an_hour_the_profiler_uses_its_share_and_no_more(seed):
    """A profiler that asks for a job whenever it is free, jobs of random GPU cost at random
    times: what it is charged stays within share x elapsed + the bank + one job, and it is
    not starved (it gets at least share x elapsed - one job)."""
    import random

    rng = random.Random(seed)
    clock = [0.0]
    budget = ProfileBudget(lambda: 0.05, lambda: True, clock=lambda: clock[0])
    biggest = 0.0
    while clock[0] < 3600.0:
        clock[0] += rng.uniform(0.1, 5.0)  # the profiler's poll, or a job's wall time
        if budget.allows_job():
            cost = rng.uniform(0.01, 2.0)
            biggest = max(biggest, cost)
            budget.charge(cost)
            assert budget.charged_s <= 0.05 * (clock[0] + BANK_S) + biggest
    assert budget.charged_s >= 0.05 * clock[0] - biggest


def _batch(rids: list[str], extend_lens: list[int] | None = None):
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(reqs=[SimpleNamespace(rid=r) for r in rids], extend_lens=extend_lens or [7] * len(rids),
                           extend_num_tokens=sum(extend_lens) if extend_lens else None,
                           forward_mode=ForwardMode.EXTEND if extend_lens else ForwardMode.DECODE)


def test_the_profilers_part_of_a_batch_is_its_tokens_or_rows():
    running = [True]
    budget = ProfileBudget(lambda: 0.05, lambda: running[0])
    mine = RID_PREFIX + "abc"
    assert budget.part_of(_batch(["u1", mine, mine], [100, 20, 30])) == pytest.approx(50 / 150)
    # a decode: rows (its extend_lens are a past prefill's)
    assert budget.part_of(_batch(["u1", "u2", mine, "u3"])) == pytest.approx(1 / 4)
    assert budget.part_of(_batch(["u1", "u2"], [10, 10])) == 0.0
    running[0] = False  # no job: batches are not looked at
    assert budget.part_of(_batch([mine])) == 0.0


def test_forward_batches_carrying_profiler_requests_are_charged_to_it():
    """Through the forward hook: the profiler's share of each batch's time, decode included;
    user batches and batches while no job runs cost it nothing."""
    import time as _time

    from evicpress_sglang.backend import prefill_timer

    budget = ProfileBudget(lambda: 0.05, lambda: True)
    prefill_timer.charge_profiler(budget)
    try:
        def forward(worker, batch):
            _time.sleep(0.02)

        mine = RID_PREFIX + "x"
        prefill_timer.around_forward(forward, None, _batch(["u1", mine]))  # decode, half the rows
        prefill_timer.around_forward(forward, None, _batch([mine], [40]))  # a prefill of its own
        prefill_timer.around_forward(forward, None, _batch(["u1"], [40]))
        assert 0.029 < budget.charged_s < 0.06  # 10 + 20 ms of the 60 ms slept
    finally:
        prefill_timer.charge_profiler(None)


def test_no_job_is_handed_out_while_the_share_is_spent(server):
    cache, _, http, profiler, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    cache.profile_budget.charge(cache.profile_budget.balance_s + 10.0)
    assert profiler.step() is False and not cache.profiling.jobs
    budget = http.get("/evicpress/status").json()["profiler"]["budget"]
    assert budget["refused_jobs"] == 1 and budget["balance_s"] < 0
    cache.profile_budget.balance_s = 1.0  # share accrued
    charged = cache.profile_budget.charged_s
    assert profiler.step() is True
    assert cache.profile_budget.charged_s > charged  # staging the copies was charged (no GPU forwards here)


@pytest.mark.parametrize("first_alone", [False, True])
def test_a_variants_queries_are_asked_together(first_alone):
    """All in flight at once (each waits until the others started: asked one by one, the
    barrier breaks); for a recomputed reference the first goes alone, as it makes the KV."""
    started, together = [], threading.Barrier(4 - first_alone, timeout=10)

    def ask_one(x: int) -> int:
        started.append(x)
        if first_alone and x == 0:
            assert started == [0]
        else:
            together.wait()
        return 10 * x

    assert ask_together(ask_one, [0, 1, 2, 3], first_alone=first_alone) == [0, 10, 20, 30]
    assert sorted(started) == [0, 1, 2, 3] and (started[0] == 0 or not first_alone)
    assert ask_together(ask_one, []) == []


def test_a_job_asked_for_by_node_is_never_the_background_loops(server):
    cache, _, http, _, _ = server
    for q in ([1, 2, 3], [4, 5, 6]):
        ask(cache, DOC, q)
    client = ServerClient("http://testserver", http=http)
    background = client.jobs(want=1)["jobs"][0]
    short = list(range(7000, 7010))  # reused but too short to profile: the scheduler makes no job for it
    for q in ([1], [2]):
        ask(cache, short, q)
    node = _find(cache, short + [7, 8, 9])
    refused = client.jobs(node=node.id)
    assert refused["jobs"] == [] and "fewer than profile_min_tokens" in refused["refusal"]["reason"]
    mine = client.jobs(node=background["node"])["jobs"]
    assert len(mine) == 1 and mine[0]["job"] != background["job"] and mine[0]["asked_for"]
    assert [j["job"] for j in client.jobs(want=1)["jobs"]] == [background["job"]]


def test_a_context_nobody_reused_is_profiled_with_questions_the_model_writes(server):
    cache, _, _, profiler, _ = server
    ask(cache, DOC, [1, 2, 3])  # cached once, never reused: no held-out query
    node = _find(cache, DOC + [7, 8, 9, 1, 2, 3])
    assert profiler.step() is False  # off by default: nothing to profile it with
    cache.settings.profile_self_questions = 2
    assert profiler.step() is True
    rec = cache.profiling.records[node.id]
    assert set(rec.quality) == {"int8", "int2", "keydiff:0.5"} and rec.queries == 0
    assert profile_namespaces(cache) == [] and free_slots_accounted(cache)
    assert profiler.step() is False  # done until it is reused
    ask(cache, DOC, [4, 5, 6])  # the first real reuse: profiled again, now with what was really asked
    assert profiler.step() is True
