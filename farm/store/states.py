"""The one state machine of jobs and tasks.

Every status change of a job or a task goes through :func:`transition`, which checks the move against
:data:`JOB_TRANSITIONS` / :data:`TASK_TRANSITIONS`, updates the row and adds an :class:`~farm.store.models.Event`
in the caller's session, so that the row and its event are committed in one transaction. In the
coordinator's step session the update is a compare-and-set: it names the status it moves from, so a
copy of the row kept in memory that went stale cannot move the row (:class:`farm.store.writes.StaleRow`). A move that is
not in the table raises :class:`IllegalTransition`; nothing is written then. In the coordinator's step
session (:class:`farm.store.writes.StepSession`) the row update and the event are buffered and sent with the
step's other writes in a few executemany statements; the checks and the rows written are the same.
"""
from __future__ import annotations

import enum
import time

from farm.store.changes import touched
from farm.store.writes import PlainRow, add_row, set_columns


class JobStatus(str, enum.Enum):
    probing = "probing"      # submitted, no render history for its scene: one probe frame measures it first;
                             # then its quote is locked and it goes on (funding or queued). Only its probe task
                             # (Task.probe) is leased meanwhile (farm/kinds/probe.py)
    funding = "funding"      # submitted; its deposit is not confirmed in escrow yet: no leases
    queued = "queued"        # submitted, no task started yet
    active = "active"        # at least one task leased
    paused = "paused"        # creator paused it: no new leases
    rendered = "rendered"    # every task accepted; waiting for the creator's review
    approved = "approved"    # creator approved; payout pending
    paid = "paid"            # payout settled on chain
    rejected = "rejected"    # creator rejected (some) outputs; they are re-rendered
    canceled = "canceled"
    failed = "failed"


class CheckStatus(str, enum.Enum):
    """The verdict of a spot check (``Check.status``), set once by farm.verify.verifier."""
    pending = "pending"          # its re-render is queued or running
    passed = "passed"            # the re-render matched: the result is accepted
    failed = "failed"            # it did not: the result is voided, the worker loses reputation
    disputed = "disputed"        # a verifier not yet trusted disagreed: a third worker settles it
    unverified = "unverified"    # no decision could be made (no worker to run it, three different renders)
    canceled = "canceled"        # the checked task went away, or the check could not be rendered


class TaskStatus(str, enum.Enum):
    waiting = "waiting"      # depends on tasks not accepted yet (assembling tiles, encoding a video)
    queued = "queued"        # waiting for a worker (also after a lost lease or a retryable failure)
    assigned = "assigned"    # leased to a worker, TASK sent
    running = "running"      # the worker reported progress
    done = "done"            # RESULT received, outputs stored
    verifying = "verifying"  # a spot check is under way
    accepted = "accepted"    # counted as good work (paid on approval)
    failed = "failed"        # out of attempts or a fault of the scene
    canceled = "canceled"


J, T = JobStatus, TaskStatus

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.probing: frozenset({J.funding, J.queued, J.canceled, J.failed}),
    J.funding: frozenset({J.queued, J.canceled, J.failed}),
    J.queued: frozenset({J.active, J.paused, J.canceled, J.failed}),
    J.active: frozenset({J.paused, J.rendered, J.canceled, J.failed}),
    J.paused: frozenset({J.queued, J.active, J.canceled}),
    J.rendered: frozenset({J.approved, J.rejected, J.canceled}),
    J.rejected: frozenset({J.active, J.rendered, J.canceled, J.failed}),
    J.approved: frozenset({J.paid}),
    J.paid: frozenset(),
    J.canceled: frozenset(),
    J.failed: frozenset(),
}

TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    T.waiting: frozenset({T.queued, T.canceled}),
    # → waiting: a task it depends on was voided (a failed spot check), and will be re-rendered first
    T.queued: frozenset({T.assigned, T.canceled, T.failed, T.waiting}),
    T.assigned: frozenset({T.running, T.done, T.queued, T.failed, T.canceled, T.waiting}),
    T.running: frozenset({T.done, T.queued, T.failed, T.canceled, T.waiting}),
    T.done: frozenset({T.verifying, T.accepted, T.queued, T.canceled, T.waiting}),
    T.verifying: frozenset({T.accepted, T.queued, T.canceled, T.waiting}),
    # voided by a failed spot check or a creator's rejection; re-checked when its worker is caught cheating
    T.accepted: frozenset({T.queued, T.verifying}),
    T.failed: frozenset({T.queued}),     # an operator retries it
    T.canceled: frozenset(),
}

JOB_TERMINAL = frozenset({J.paid, J.canceled, J.failed})
JOB_SCHEDULABLE = frozenset({J.queued, J.active, J.rejected})
TASK_LEASED = frozenset({T.assigned, T.running})
TASK_FINISHED = frozenset({T.accepted, T.failed, T.canceled})


class IllegalTransition(ValueError):
    """A status change that the transition table does not allow."""


_ALLOWED = frozenset([("job", a.value, b.value) for a, bs in JOB_TRANSITIONS.items() for b in bs]
                     + [("task", a.value, b.value) for a, bs in TASK_TRANSITIONS.items() for b in bs])
"""The two tables as (kind, old, new) triples of plain strings: one set lookup per transition."""


def can_transition(kind: str, old: str, new: str) -> bool:
    kind = "job" if kind == "job" else "task"
    return (kind, str(getattr(old, "value", old)), str(getattr(new, "value", new))) in _ALLOWED


class QueueEpoch:
    """A counter that moves whenever the set or order of queued, schedulable tasks may have changed other
    than by a lease: a task queued (or leaving ``queued`` other than to ``assigned``), a job changing
    status, and (through :mod:`farm.core.leases`' session hooks) any task, job or job-worker row written through
    the ORM. It moves when the change is made, for readers in the same transaction, and again when the
    transaction commits, for everyone else. A copy of the queue read at one value is good while it holds."""

    def __init__(self):
        self.value = 0

    def move(self, session=None) -> None:
        self.value += 1
        if session is not None:
            session.info["queue_changed"] = True


QUEUE_EPOCH = QueueEpoch()
_QUEUED_S, _ASSIGNED_S = "queued", "assigned"


def transition(session, row, new: str | enum.Enum, *, reason: str = "", worker_id: str | None = None,
               attempt: int | None = None, now: float | None = None, values: dict | None = None) -> None:
    """Move ``row`` (a Job or a Task) to ``new`` and record the event, in ``session`` (not committed);
    ``values``: other columns of ``row`` to set with its status (one update of the row)."""
    models = _models or _load_models()
    kind = "job" if isinstance(row, models.Job) else "task"
    new_s = new.value if isinstance(new, enum.Enum) else str(new)
    old_s = row.status
    if (kind, old_s, new_s) not in _ALLOWED and not can_transition(kind, old_s, new_s):
        raise IllegalTransition(f"{kind} {row.id}: {old_s} → {new_s} is not allowed")
    now = time.time() if now is None else now
    if kind == "job" or new_s == _QUEUED_S or (old_s == _QUEUED_S and new_s != _ASSIGNED_S):
        QUEUE_EPOCH.move(session)
    writes = getattr(session, "writes", None)
    if writes is not None:  # compare and set: the row's buffered update lands only on the status read
        writes.fence(row.model if isinstance(row, PlainRow) else type(row), row.id, {"status": old_s})
    columns = {**values, "status": new_s, "updated_at": now} if values else {"status": new_s, "updated_at": now}
    set_columns(session, row, columns)
    job_id = row.id if kind == "job" else row.job_id
    add_row(session, models.Event, at=now, kind=kind, job_id=job_id,
            task_id=row.id if kind == "task" else None, attempt=attempt, worker_id=worker_id,
            old=old_s, new=new_s, detail=reason[:2000])
    touched(session, job_id)  # its live page wakes when this commits


def transition_tasks(session, task_ids: list[int], olds: tuple[str, ...], new: str | enum.Enum, *, reason: str,
                     now: float | None = None) -> int:
    """Move the tasks ``task_ids`` that are in one of ``olds`` to ``new`` in two statements (an UPDATE and an
    INSERT … SELECT of their events), for bulk moves of thousands of rows (a big job's cancel) that must not
    hold the coordinator's thread for seconds. The same table is checked; leased tasks (which have workers
    and attempts to end) are not for this. Returns the rows moved."""
    from sqlalchemy import insert, literal, select, update
    models = _models or _load_models()
    Task, Event = models.Task, models.Event
    new_s = new.value if isinstance(new, enum.Enum) else str(new)
    for old in olds:
        if not can_transition("task", old, new_s):
            raise IllegalTransition(f"task: {old} → {new_s} is not allowed")
    if not task_ids:
        return 0
    now = time.time() if now is None else now
    which = (Task.id.in_(task_ids), Task.status.in_(olds))
    session.execute(insert(Event).from_select(
        ["at", "kind", "job_id", "task_id", "attempt", "worker_id", "old", "new", "detail"],
        select(literal(now), literal("task"), Task.job_id, Task.id, Task.attempt, Task.worker_id, Task.status,
               literal(new_s), literal(reason[:2000])).where(*which)))
    moved = session.execute(update(Task).where(*which).values(status=new_s, updated_at=now, worker_id=None,
                                                              lease_expires=None)
                            .execution_options(synchronize_session=False)).rowcount
    QUEUE_EPOCH.move(session)
    return moved


_models = None  # farm.store.models, once imported (it imports this module's enums: not at import time)


def _load_models():
    global _models
    from farm.store import models
    _models = models
    return models
