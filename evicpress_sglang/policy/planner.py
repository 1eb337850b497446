"""Placement plans, and a thread that keeps one current off the scheduler's critical path.

A re-plan of 100k contexts is tens of milliseconds of numpy. Done inside SGLang's
``evict()`` it holds the scheduler thread, and with it every request of the batch, decode
included. The :class:`BackgroundPlanner` plans instead in a thread of its own, on a
snapshot of the context table (:meth:`ContextTable.snapshot`), and the scheduler applies
the ready plan's steps within a time budget.

A plan is the placement's demotions in the order to carry them out. Each step names a
row, the row's version and configuration when it was planned, and the configuration to
move to; it is applied only while the row is still exactly that (:meth:`Plan.holds`), so
a stale plan can only do less than it planned, never something the table no longer
supports. The same builder serves the synchronous path (:func:`build_plan`), so both
order their moves alike.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .configs import Tier
from .contexts import ContextTable
from .placement import depth
from .policies import Policy, Weights, make_policy

_NONE = np.empty(0, dtype=np.int64)


@dataclass
class Plan:
    """Demotions in order (``rows`` to ``configs``), as planned from ``start``/``versions``,
    and ``lru``: the rows the plan keeps on the GPU, least recently used (then deepest)
    first, which a short or stale plan drops from instead. Cursors are the applier's."""

    rows: np.ndarray
    configs: np.ndarray
    start: np.ndarray
    versions: np.ndarray
    lru: np.ndarray = field(default_factory=lambda: _NONE)
    generation: int = 0
    cursor: int = 0
    lru_cursor: int = 0

    def holds(self, table: ContextTable, i: int) -> bool:
        """Step ``i`` still applies: its row is the context it was planned for (a row
        removed and reused has a new version) and sits where the plan found it."""
        r = self.rows[i]
        return bool(table.alive[r] and table.version[r] == self.versions[i] and table.assign[r] == self.start[i])


def build_plan(policy: Policy, table: ContextTable, capacity: np.ndarray, now: float,
               movable: np.ndarray | None = None, generation: int = 0, lru: bool = False) -> Plan:
    """The demotions of ``policy``'s placement of ``table`` into ``capacity`` ([GPU, host,
    disk, remote] bytes), in the order to apply them: slowest destination first, so a tier is
    emptied before it is filled; within one destination, recompressions of what the tier
    already holds (they free room) before arrivals; children before parents (a node
    leaves the GPU only as a leaf). Moves up are not steps: they would need a load, which
    a request does; nor is recompressing a remote context (it would read it back over the
    network on the scheduler's thread): a remote context only leaves by being dropped.
    With ``lru``, also the fallback order (see :class:`Plan`)."""
    rows, new = policy.place(capacity, now, movable)
    old = table.assign[rows]
    t_old, t_new = table.tier_of[old], table.tier_of[new]
    smaller = table.sizes[rows, new] < table.sizes[rows, old]
    down = np.flatnonzero(np.where(t_old == Tier.REMOTE, t_new == Tier.DROP,
                                   (t_new > t_old) | ((t_new == t_old) & (t_new != Tier.GPU) & smaller)))
    r = rows[down]
    order = np.lexsort((-depth(table.parent, r), t_old[down] != t_new[down], -t_new[down]))
    step = down[order]
    fallback = _NONE
    if lru:
        stay = rows[(t_new == Tier.GPU) & ~table.in_use[rows]]
        fallback = stay[np.lexsort((-depth(table.parent, stay), table.last_time[stay]))]
    return Plan(rows[step], new[step], old[step], table.version[rows[step]], fallback, generation)


@dataclass
class PlanJob:
    """What to plan for, captured under the owner's lock: a fresh snapshot of its table,
    its policy, the capacities to fit, the time, and the generation of its policy setting
    (a plan of an older generation is never applied)."""

    table: ContextTable
    policy: str
    weights: Weights
    generation: int
    capacity: np.ndarray
    now: float


class BackgroundPlanner:
    """Keeps :attr:`plan` current in a daemon thread, woken by :meth:`kick`.

    ``capture(snapshot)`` runs in that thread and takes the owner's lock itself; it
    refreshes ``snapshot`` (None at first) and returns a :class:`PlanJob`, or None when
    there is nothing to plan. The thread never touches anything else of the owner: the
    policy it plans with is its own, built from the job's name and weights over the
    snapshot, so a policy switch meanwhile changes only which plans the owner accepts.
    An exception stops the thread for good (:attr:`failed`; the owner plans synchronously
    from then on) after ``on_error`` has seen it. Both callables are held weakly: the
    thread ends with its owner.
    """

    def __init__(self, capture: Callable[[ContextTable | None], PlanJob | None],
                 on_error: Callable[[BaseException], None]) -> None:
        self._capture = weakref.WeakMethod(capture)
        self._on_error = weakref.WeakMethod(on_error)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: ContextTable | None = None
        self._policy: Policy | None = None
        self._generation = -1
        self.plan: Plan | None = None
        self.failed = False
        self.plans = 0

    def kick(self) -> None:
        """Plan again soon (the table changed, or the plan was used up)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="evicpress-planner", daemon=True)
            self._thread.start()
        self._wake.set()

    def take(self, generation: int) -> Plan | None:
        """The latest plan, if it was made under the policy setting ``generation``."""
        plan = self.plan
        return plan if plan is not None and plan.generation == generation else None

    def plan_once(self) -> bool:
        """One round: snapshot, plan, publish; False when there was nothing to plan. The
        thread's body; tests call it directly to step the planner deterministically."""
        capture = self._capture()
        job = capture(self._snapshot) if capture is not None else None
        if job is None:
            return False
        self._snapshot = t = job.table
        if self._policy is None or self._policy.table is not t or self._generation != job.generation:
            self._policy, self._generation = make_policy(job.policy, t, job.weights), job.generation
        self.plan = build_plan(self._policy, t, job.capacity, job.now, ~t.in_use[t.rows()], job.generation, lru=True)
        self.plans += 1
        return True

    def _run(self) -> None:
        while not self.failed and self._capture() is not None:
            if not self._wake.wait(timeout=1.0):
                continue
            self._wake.clear()
            try:
                self.plan_once()
            except Exception as e:  # noqa: BLE001 - never let this thread take the server down
                self.failed = True
                on_error = self._on_error()
                if on_error is not None:
                    on_error(e)
