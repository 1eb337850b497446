"""Remote reads never run on the scheduler's thread (issue 19): the prefetcher's bookkeeping,
and the plugin's gate that keeps a request out of prefill while its reads run."""

import threading
import time
from types import SimpleNamespace

from evicpress_sglang import plugin
from evicpress_sglang.backend.guard import HOOKS
from evicpress_sglang.backend.prefetch import Prefetcher
from harness import until


def _blocked_read(value, nbytes: int = 0):
    """A read that waits for its event: returns (read, event that lets it finish)."""
    go = threading.Event()

    def read():
        go.wait(10)
        return value, nbytes

    return read, go


def test_a_read_runs_once_holds_its_request_until_done_and_is_handed_over_once():
    p = Prefetcher(max_bytes=1 << 20)
    read, go = _blocked_read("blob", 100)
    p.start("k", read, rid="r1", deadline=time.monotonic() + 30)
    p.start("k", lambda: ("other", 1), rid="r2", deadline=time.monotonic() + 30)  # same name: not read again
    assert p.result("k") == (False, None) and p.known("k")
    assert p.held(["r1", "r2", "r3"]) == {"r1", "r2"}
    go.set()
    until(lambda: p.result("k")[0])
    assert p.held(["r1", "r2"]) == set()
    assert p.status()["ready_bytes"] == 100 and p.counters["started"] == 1
    assert p.take("k") == "blob" and p.take("k") is None  # handed over once, its bytes released
    assert p.status()["ready_bytes"] == 0 and not p.known("k")


def test_a_request_is_held_no_longer_than_its_deadline():
    p = Prefetcher(max_bytes=1 << 20)
    read, go = _blocked_read("blob")
    p.start("k", read, rid="r", deadline=time.monotonic() + 0.05)
    assert p.held(["r"]) == {"r"}
    until(lambda: not p.held(["r"]))
    assert p.result("k") == (False, None) and p.counters["late"] == 1  # still running, no longer waited for
    go.set()
    until(lambda: p.result("k")[0])


def test_absent_and_failed_reads_are_remembered_as_misses_for_a_while():
    p = Prefetcher(max_bytes=1 << 20, keep_s=0.2)

    def boom():
        raise OSError("EIO")

    p.start("absent", lambda: (None, 0))
    p.start("failed", boom)
    until(lambda: p.result("absent")[0] and p.result("failed")[0])
    assert p.result("absent") == (True, None) and p.result("failed") == (True, None)
    assert p.take("absent") is None and p.result("absent") == (True, None)  # still remembered
    assert p.counters["failed"] == 1 and p.counters["absent"] == 2
    until(lambda: not p.known("absent"), timeout=5)  # forgotten after keep_s: asked again later


def test_finished_reads_stay_within_the_byte_budget_oldest_first():
    p = Prefetcher(max_bytes=250)
    for i in range(4):
        p.start(f"k{i}", lambda i=i: (f"v{i}", 100))
        until(lambda i=i: p.result(f"k{i}")[0])
    assert p.status()["ready_bytes"] <= 250
    assert not p.known("k0") and not p.known("k1") and p.take("k3") == "v3"
    assert p.counters["evicted"] == 2


class _Scheduler:
    """What the plugin's gate touches of SGLang's Scheduler."""

    def __init__(self, cache, rids):
        self.tree_cache = cache
        self.waiting_queue = [SimpleNamespace(rid=r) for r in rids]


def _gate(scheduler, original):
    return plugin._gate_prefill(original, scheduler)


def test_the_gate_keeps_held_requests_out_of_one_round_and_puts_them_back_first(monkeypatch):
    cache = SimpleNamespace(shared=object(), held_for_prefetch=lambda rids: {"b", "d"})
    monkeypatch.setattr(plugin, "_evicpress_cache", lambda s: s.tree_cache)
    s = _Scheduler(cache, "abcde")
    seen = []

    def original(sched):
        seen.append([r.rid for r in sched.waiting_queue])
        sched.waiting_queue = [r for r in sched.waiting_queue if r.rid != "a"]  # "a" was scheduled
        return "batch"

    assert _gate(s, original) == "batch"
    assert seen == [["a", "c", "e"]]
    assert [r.rid for r in s.waiting_queue] == ["b", "d", "c", "e"]


def test_the_profilers_requests_wait_while_a_user_request_waits(monkeypatch):
    """The quality profiler's requests sit a round out while a user request waits (and is not
    itself held), with or without a shared store; alone in the queue they go."""
    from evicpress_sglang.profiler.client import RID_PREFIX

    monkeypatch.setattr(plugin, "_evicpress_cache", lambda s: s.tree_cache)
    p1, p2 = RID_PREFIX + "1", RID_PREFIX + "2"
    seen = []

    def original(sched):
        seen.append([r.rid for r in sched.waiting_queue])
        return "batch"

    s = _Scheduler(SimpleNamespace(shared=None), [p1, "u", p2])
    assert _gate(s, original) == "batch" and seen[-1] == ["u"]
    assert [r.rid for r in s.waiting_queue] == [p1, p2, "u"]  # back in front, for when users are served
    s = _Scheduler(SimpleNamespace(shared=None), [p1, p2])
    _gate(s, original)
    assert seen[-1] == [p1, p2]  # no user waits: the profiler's turn
    # the only user request waits for its remote reads: nobody is served ahead of the profiler
    s = _Scheduler(SimpleNamespace(shared=object(), held_for_prefetch=lambda rids: {"u"}), [p1, "u"])
    _gate(s, original)
    assert seen[-1] == [p1]


def test_a_profiler_request_yields_a_bounded_number_of_rounds(monkeypatch):
    """A user request that cannot be admitted (it waits for the memory a profile job pins)
    must not hold that job's requests back for ever: after max_rounds they go."""
    from evicpress_sglang.profiler.client import RID_PREFIX

    monkeypatch.setattr(plugin, "_evicpress_cache", lambda s: s.tree_cache)
    monkeypatch.setattr(plugin, "_PROFILER_YIELDS", plugin.ProfilerYields(max_rounds=3))
    seen = []

    def never_admits_the_user(sched):
        seen.append([r.rid for r in sched.waiting_queue])
        sched.waiting_queue = [r for r in sched.waiting_queue if r.rid == "u"]  # the profiler's ran
        return None

    s = _Scheduler(SimpleNamespace(shared=None), [RID_PREFIX + "a", "u"])
    for _ in range(5):
        _gate(s, never_admits_the_user)
    assert seen == [["u"], ["u"], ["u"], [RID_PREFIX + "a", "u"], ["u"]]
    assert plugin._PROFILER_YIELDS.rounds == {}  # forgotten once it left the queue


def test_a_failing_gate_is_stock_behaviour_and_an_error_in_prefill_keeps_the_queue(monkeypatch):
    def broken(rids):
        raise RuntimeError("bug in our code")

    monkeypatch.setattr(plugin, "_evicpress_cache", lambda s: s.tree_cache)
    s = _Scheduler(SimpleNamespace(shared=object(), held_for_prefetch=broken), "ab")
    before = HOOKS.errors_by_entry.get("_hold_back", 0)
    assert _gate(s, lambda sched: [r.rid for r in sched.waiting_queue]) == ["a", "b"]  # nobody held
    assert HOOKS.errors_by_entry["_hold_back"] == before + 1

    s = _Scheduler(SimpleNamespace(shared=object(), held_for_prefetch=lambda rids: {"a"}), "ab")

    def sglang_fails(sched):
        raise ValueError("SGLang's own error")

    try:
        _gate(s, sglang_fails)
    except ValueError:
        pass
    else:
        raise AssertionError("SGLang's own error must stay SGLang's")
    assert [r.rid for r in s.waiting_queue] == ["a", "b"]  # the held request is back
