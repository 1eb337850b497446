"""The cache lives inside someone's production server: no exception of ours may reach
SGLang's scheduler. Every SGLang entry point runs through :func:`entry_point`, which on
an error counts it, logs it once with its traceback, checks the cache's own state, and
returns the entry point's safe answer instead (a miss, or what stock SGLang would do).

When the check finds the state inconsistent, the cache repairs SGLang's size counters and
*degrades*: stock eviction, no more load-backs, and status says why. An operator may turn
it back on by choosing a policy again, which re-checks the state first.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections import defaultdict
from typing import Any, Callable, TypeVar

from .tp_sync import RankAbort

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class Health:
    """Internal errors, environment failures worth one log line, and degradation."""

    def __init__(self) -> None:
        self.internal_errors = 0
        self.errors_by_entry: dict[str, int] = defaultdict(int)
        self.last_error: str | None = None
        self.degraded: str | None = None  # why the cache runs as stock SGLang now
        self._logged: set[tuple[str, str]] = set()
        self.exporter = None  # a PrometheusExporter with --enable-metrics

    @property
    def loads_allowed(self) -> bool:
        return self.degraded is None

    def record(self, entry: str, exc: BaseException) -> None:
        """Count an exception our code raised inside SGLang's call ``entry``; the first of
        each kind per entry point is logged with its traceback, later ones only counted."""
        self.internal_errors += 1
        self.errors_by_entry[entry] += 1
        self.last_error = f"{entry}: {type(exc).__name__}: {exc}"
        if self.exporter is not None:
            self.exporter.internal_error(entry)
        if self._once(entry, type(exc).__name__):
            log.error("evicpress: internal error in %s, answered as a miss/stock behaviour (logged once, counted "
                      "in internal_errors):\n%s", entry, "".join(traceback.format_exception(exc)))

    def note_tier_failure(self, what: str, exc: BaseException) -> None:
        """A tier's I/O failure (full disk, EIO, an unreachable store): the caller turns it
        into a miss or a drop; logged once per kind so an outage does not flood the log."""
        if self._once(what, type(exc).__name__):
            log.warning("evicpress: %s failed (%s: %s); treated as a miss from now on, logged once",
                        what, type(exc).__name__, exc)

    def degrade(self, reason: str) -> None:
        if self.degraded is None:
            log.error("evicpress: %s; running as stock SGLang (policy off, no load-backs) until a policy is set "
                      "again through /evicpress/policy", reason)
        self.degraded = reason

    def _once(self, where: str, kind: str) -> bool:
        first = (where, kind) not in self._logged
        self._logged.add((where, kind))
        return first

    def to_dict(self) -> dict:
        return {"internal_errors": self.internal_errors, "errors_by_entry": dict(self.errors_by_entry),
                "last_error": self.last_error, "degraded": self.degraded}


def entry_point(fallback: Callable[..., Any]) -> Callable[[F], F]:
    """Guard an SGLang entry point of the cache: on an exception, record it, let the cache
    check its state (``_after_internal_error``) and return ``fallback(self, *args, **kwargs)``.
    Fallbacks are trivially safe (an empty match, freeing a request's own slots).

    Under tensor parallelism an entry point in which ranks agree (``cache._closes(name)``,
    decided from agreed state, so alike on every rank) ends with a closing collective that
    also carries a failure here; a rank that failed, or saw another fail
    (:class:`~.tp_sync.RankAbort`), degrades with every other, and no rank waits for one
    that has left (see :mod:`.tp_sync`)."""

    def wrap(method: F) -> F:
        name = method.__name__

        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            closes = getattr(self, "_closes", None)
            closing = closes is not None and closes(name)
            try:
                result = method(self, *args, **kwargs)
            except RankAbort as e:  # that collective was this rank's close
                self.health.record(name, e)
                self._degrade("another tensor-parallel rank failed in the same step")
                return fallback(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the whole point: nothing reaches the scheduler
                self.health.record(name, e)
                self._after_internal_error()
                if closing:
                    self._close_step(name, failed=True)
                return fallback(self, *args, **kwargs)
            if closing:
                self._close_step(name, failed=False)
            return result

        return guarded  # type: ignore[return-value]

    return wrap


#: Errors of the plugin's hooks into SGLang's scheduler, model worker and batches, which
#: run outside any one cache; status reports them next to the cache's own.
HOOKS = Health()


def hook(fallback: Callable[..., Any]) -> Callable[[F], F]:
    """Guard our part of an SGLang hook: on an exception, record it in :data:`HOOKS` and
    return ``fallback(*args, **kwargs)``. An AROUND hook guards only its own steps and
    calls SGLang's original outside them, so SGLang's own errors stay SGLang's and the
    original never runs twice."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                HOOKS.record(fn.__name__, e)
                return fallback(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return wrap
