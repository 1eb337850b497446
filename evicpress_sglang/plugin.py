"""The SGLang plugin: loaded by SGLang in every process (entry point group
``sglang.srt.plugins``), it registers the ``evicpress`` radix-cache backend, teaches
the scheduler the admin requests, adds the admin endpoints to the HTTP server, and
shifts the positions of requests served from token-dropped contexts."""

from __future__ import annotations

import logging
import multiprocessing
import sys

from .backend.guard import hook
from .profiler.client import RID_PREFIX

log = logging.getLogger(__name__)

BACKEND = "evicpress"


def _factory(ctx):
    from .backend.cache import build

    return build(ctx)


def _evicpress_cache(scheduler):
    from .backend.cache import EvicPressRadixCache

    cache = getattr(scheduler, "tree_cache", None)
    return cache if isinstance(cache, EvicPressRadixCache) else None


@hook(lambda result, *args, **kwargs: result)
def _add_status(result, scheduler, *args, **kwargs):
    """After ``Scheduler.get_internal_state``: include the cache's status."""
    cache = _evicpress_cache(scheduler)
    if cache is not None:
        result.internal_state["evicpress"] = cache.status()
        result.internal_state["evicpress_profile"] = cache.profiling.outbox()
    return result


def _set_state(original, scheduler, recv_req, *args, **kwargs):
    """Around ``Scheduler.set_internal_state``: take the ``evicpress_*`` keys, pass the rest on."""
    answer, rest = _apply_ours(scheduler, recv_req)
    if answer is not None:
        return answer
    return original(scheduler, rest, *args, **kwargs)


def _refused(scheduler, recv_req):
    from sglang.srt.managers.io_struct import SetInternalStateReqOutput

    return SetInternalStateReqOutput(updated=False), None


@hook(_refused)
def _apply_ours(scheduler, recv_req):
    """Apply the ``evicpress_*`` keys of a ``SetInternalStateReq``. Returns (the answer, None)
    when nothing is left for SGLang, else (None, the request SGLang should see)."""
    from sglang.srt.managers.io_struct import SetInternalStateReq, SetInternalStateReqOutput

    from .admin import apply_policy_request, apply_profile_request

    ours = {k: v for k, v in recv_req.server_args.items() if k.startswith("evicpress_")}
    if not ours:
        return None, recv_req
    cache = _evicpress_cache(scheduler)
    if cache is None:
        log.warning("evicpress: policy change asked for, but this server does not run the evicpress cache")
        return SetInternalStateReqOutput(updated=False), None
    try:
        if any(k.startswith("evicpress_profile") for k in ours):
            if not apply_profile_request(cache, ours, idle=not scheduler.waiting_queue):
                return SetInternalStateReqOutput(updated=False), None
        else:
            apply_policy_request(cache, ours)
    except ValueError as e:
        log.warning("evicpress: request refused: %s", e)
        return SetInternalStateReqOutput(updated=False), None
    rest = {k: v for k, v in recv_req.server_args.items() if k not in ours}
    if rest:
        return None, SetInternalStateReq(server_args=rest)
    return SetInternalStateReqOutput(updated=True), None


@hook(lambda *args, **kwargs: None)
def _on_arrival(result, scheduler, req, *args, **kwargs):
    """After ``Scheduler._add_request_to_queue``: start the request's remote reads."""
    cache = _evicpress_cache(scheduler)
    if cache is not None and cache.shared is not None:
        cache.prefetch_for(req)


@hook(lambda scheduler: [])
def _hold_back(scheduler) -> list:
    """The waiting requests taken out of the queue for one round of prefill scheduling (the
    scheduler decodes meanwhile): those whose remote reads still run, and the quality
    profiler's while a user request waits, so that the profiler works in the gaps of user
    traffic instead of ahead of it (issue 21: user TTFT with the profiler on). The choice
    depends on the queue alone, which every TP rank holds alike."""
    cache = _evicpress_cache(scheduler)
    if cache is None or not scheduler.waiting_queue:
        return []
    rids = [r.rid for r in scheduler.waiting_queue]
    held = cache.held_for_prefetch(rids) if cache.shared is not None else set()
    held = held | _PROFILER_YIELDS.held(rids, held)
    if not held:
        return []
    out = [r for r in scheduler.waiting_queue if r.rid in held]
    scheduler.waiting_queue = [r for r in scheduler.waiting_queue if r.rid not in held]
    return out


class ProfilerYields:
    """Which of the quality profiler's waiting requests sit a prefill round out because a user
    request waits. Each at most ``max_rounds`` rounds per stay in the queue (a retracted request
    starts again; a job's next requests have rounds of their own): a profile job pins its context and
    copies until its requests finish, and a user request that only fits once they are released
    must not wait for a job that waits for it (the scheduler evicts nothing for a request it
    cannot admit). Rounds, not seconds, so that every TP rank, which runs the same rounds,
    decides alike."""

    def __init__(self, max_rounds: int = 200) -> None:
        self.max_rounds = max_rounds
        self.rounds: dict[str, int] = {}  # profiler rid -> rounds held so far

    def held(self, rids: list, held_already: set) -> set:
        profiler = [rid for rid in rids if isinstance(rid, str) and rid.startswith(RID_PREFIX)]
        self.rounds = {rid: self.rounds.get(rid, 0) for rid in profiler}  # forget requests gone from the queue
        if not profiler or not any(rid not in self.rounds and rid not in held_already for rid in rids):
            return set()  # no user request waits that could go instead
        out = {rid for rid in profiler if self.rounds[rid] < self.max_rounds}
        for rid in out:
            self.rounds[rid] += 1
        return out


_PROFILER_YIELDS = ProfilerYields()


def _gate_prefill(original, scheduler, *args, **kwargs):
    """Around ``Scheduler.get_new_batch_prefill``: the requests :func:`_hold_back` picks (still
    waiting for the store, or the profiler's while a user waits) sit this round out, then go
    back to the head of the queue."""
    held = _hold_back(scheduler)
    try:
        return original(scheduler, *args, **kwargs)
    finally:
        if held:
            scheduler.waiting_queue = held + scheduler.waiting_queue


def _time_prefill(original, worker, batch=None, *args, **kwargs):
    from .backend.prefill_timer import around_forward

    return around_forward(original, worker, batch, *args, **kwargs)


@hook(lambda forward_batch, *args, **kwargs: forward_batch)
def _shift_positions(forward_batch, cls, *args, **kwargs):
    """After ``ForwardBatch.init_new``: positions of requests served from token-dropped contexts."""
    from .backend.dropped import shift_positions

    batch = kwargs["batch"] if "batch" in kwargs else args[0]
    shift_positions(forward_batch, batch)
    return forward_batch


def load() -> None:
    """Entry point; idempotent (SGLang may call plugin loading more than once)."""
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND, _factory)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.get_internal_state", _add_status,
                              HookType.AFTER)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.set_internal_state", _set_state,
                              HookType.AROUND)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", _on_arrival,
                              HookType.AFTER)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", _gate_prefill,
                              HookType.AROUND)
        HookRegistry.register("sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation",
                              _time_prefill, HookType.AROUND)
        HookRegistry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
                              _shift_positions, HookType.AFTER)
        if multiprocessing.current_process().name == "MainProcess":  # where the HTTP server runs
            HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", _before_launch,
                                  HookType.BEFORE)
    install_routes()  # in case SGLang loads plugins after the HTTP module is up


_profiler = None  # this HTTP process's quality profiler, once the server is launched


def _before_launch(*args, **kwargs):
    """Before ``launch_server``: start the quality profiler (it waits until the server
    answers) and add the admin endpoints."""
    global _profiler
    server_args = kwargs["server_args"] if "server_args" in kwargs else args[0]
    if getattr(server_args, "radix_cache_backend", None) == BACKEND and _profiler is None:
        from .profiler.runner import start_in_server
        from .settings import load_settings

        settings = load_settings()
        host = server_args.host if server_args.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        _profiler = start_in_server(f"http://{host}:{server_args.port}", settings, server_args.api_key,
                                    settings.admin_key or getattr(server_args, "admin_api_key", None))
    install_routes()


def _get_profiler():
    if _profiler is None:
        raise RuntimeError("evicpress: the profiler starts with the server (--radix-cache-backend evicpress)")
    return _profiler


def install_routes() -> bool:
    """Add the admin endpoints to SGLang's FastAPI app, once; False if it is not loaded."""
    http = sys.modules.get("sglang.srt.entrypoints.http_server")
    if http is None:
        return False
    if not any(getattr(r, "path", "") == "/evicpress/status" for r in http.app.routes):
        from .admin import add_routes

        add_routes(http.app, lambda: http._global_state.tokenizer_manager, _get_profiler)
    return True
