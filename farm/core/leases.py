"""Tasks as the coordinator's hot path holds them: plain rows, the in-memory book of live leases, the
head of the queue read ahead, and when each lease last made progress.

A task is read from the database when it is leased (the assignment window reads it as a plain
:class:`TaskRow`) and, while the lease lasts, only the coordinator changes it: its RESULT, PROGRESS and
HEARTBEAT messages can be answered from the copy kept in :class:`LeaseBook`, without reading the row
again. The copy is only a cache, never trusted blindly:

* every update of a task taken from the book is *fenced* (:meth:`farm.store.writes.Writes.fence`): it names the
  attempt, worker and status the copy holds in its WHERE clause, and when the database row changed
  anyway (an API call, a bug, a second coordinator) the update matches nothing, the step rolls back, the
  book is emptied and the batch is handled again from the database;
* a copy enters the book only when the step that leased it committed, and leaves it when its lease ends
  by any path (result, failure, loss, cancel); a rolled-back step empties the book (its copies may hold
  values that were never committed).

:class:`ReadAhead` does the same for queued tasks: the assignment rounds lease from a copy of the first
few hundred queued tasks while :data:`farm.store.states.QUEUE_EPOCH` says nothing queued, requeued or
re-prioritised since it was read, each lease fenced on (status queued, attempt).

:class:`ProgressWatch` keeps what leases need to stay alive: progress, not heartbeats alone.
"""
from __future__ import annotations

import itertools
import json

from sqlalchemy import Text, event, type_coerce
from sqlalchemy.orm import Session

from farm import constants as C
from farm.store.models import Job, JobWorker, Task
from farm.store.states import QUEUE_EPOCH
from farm.store.writes import PlainRow


def _json(value):
    """A JSON column read as text (SQLite), or already decoded by the driver (psycopg)."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


class TaskRow(PlainRow):
    """A task as plain columns (not an ORM instance), its JSON columns decoded only when read (the
    assignment window holds more rows than are leased); :func:`farm.store.writes.set_values` and
    :func:`farm.store.states.transition` update it by primary key like a loaded Task."""
    __slots__ = ("id", "job_id", "index", "kind", "priority", "_spec", "_inputs", "status", "attempt",
                 "_failed", "check_id", "progress_total", "worker_id", "lease_expires", "progress_done",
                 "updated_at", "render_seconds", "work_units", "started_at")
    model = Task

    def __init__(self, id, job_id, index, kind, priority, spec, inputs, status, attempt, failed_workers, check_id,
                 progress_total):
        self.id, self.job_id, self.index, self.kind, self.priority = id, job_id, index, kind, priority
        self._spec, self._inputs, self.status, self.attempt = spec, inputs, status, attempt
        self._failed, self.check_id, self.progress_total = failed_workers, check_id, progress_total
        self.worker_id = self.lease_expires = None
        self.progress_done, self.render_seconds, self.started_at = 0, 0.0, 0.0

    @property
    def spec(self) -> dict:
        if isinstance(self._spec, (str, bytes)):
            self._spec = _json(self._spec)
        return self._spec

    @property
    def inputs(self) -> list:
        if isinstance(self._inputs, (str, bytes)):
            self._inputs = _json(self._inputs)
        return self._inputs

    @property
    def failed_workers(self) -> list:
        if isinstance(self._failed, (str, bytes)):
            self._failed = _json(self._failed)
        return self._failed


COLUMNS = (Task.id, Task.job_id, Task.index, Task.kind, Task.priority, type_coerce(Task.spec, Text),
           type_coerce(Task.inputs, Text), Task.status, Task.attempt, type_coerce(Task.failed_workers, Text),
           Task.check_id, Task.progress_total)
"""The columns a :class:`TaskRow` is made of, in its constructor's order (JSON columns as stored: text on
SQLite, decoded when read)."""

# The columns whose values identify a lease: a fenced update of a task names them.
FENCE = ("attempt", "worker_id", "status")


class LeaseBook:
    """Live leases' tasks by task id (committed state only; see the module's docstring)."""

    MAX = 100_000  # a farm with more live leases reads the rest from the database

    def __init__(self):
        self.rows: dict[int, TaskRow] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, s, task_id: int) -> TaskRow | None:
        """The leased task's copy, fenced in ``s`` (its updates in this transaction check the lease), or
        None when the book does not hold it (read it from the database)."""
        row = self.rows.get(task_id)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        s.writes.fence(Task, row.id, {"attempt": row.attempt, "worker_id": row.worker_id, "status": row.status})
        return row

    def commit(self, leased: list[TaskRow]) -> None:
        """Keep the copies of the leases a committed step granted."""
        if len(self.rows) + len(leased) > self.MAX:
            return
        for row in leased:
            self.rows[row.id] = row

    def drop(self, task_id: int) -> None:
        self.rows.pop(task_id, None)

    def clear(self) -> None:
        self.rows.clear()


class ReadAhead:
    """The head of the queue, read ahead: queued tasks of schedulable jobs in claim order (priority, then
    job and index), with the job-worker blocklist of their jobs, read in one go and leased from memory in
    the assignment rounds that follow, until :data:`farm.store.states.QUEUE_EPOCH` moves (a task queued, a job's
    status changed, a blocklist written …) or a rollback drops it. Leases taken from it are fenced on
    (status queued, attempt), like the lease book's copies: a stale copy never leases a task twice."""

    SIZE = 256  # rows read at once (at least the round's window)

    def __init__(self):
        self.rows: dict[int, tuple[TaskRow, int]] = {}  # task id → (row, job id), in claim order
        self.blocked: set[tuple[int, str]] = set()
        self.epoch: int | None = None
        self.complete = False  # the read returned every queued task there was
        self.reads = 0

    def covers(self, limit: int) -> bool:
        """Whether the copy is current and holds the first ``limit`` queued tasks."""
        return self.epoch == QUEUE_EPOCH.value and (self.complete or len(self.rows) >= limit)

    def fill(self, rows: list[tuple[TaskRow, int]], blocked: set[tuple[int, str]], asked: int, epoch: int) -> None:
        """Replace the copy by ``rows`` (read for ``asked`` rows, with the epoch as it was before the read)."""
        self.rows = {r.id: (r, j) for r, j in rows}
        self.blocked, self.complete, self.epoch = blocked, len(rows) < asked, epoch
        self.reads += 1

    def first(self, limit: int) -> list[tuple[TaskRow, int]]:
        return list(itertools.islice(self.rows.values(), limit))

    def leased(self, task_id: int) -> None:
        self.rows.pop(task_id, None)

    def clear(self) -> None:
        self.rows, self.blocked, self.epoch, self.complete = {}, set(), None, False


_WATCHED = (Task, Job, JobWorker)


@event.listens_for(Session, "before_flush")
def _orm_changes(session, _ctx, _instances) -> None:
    """Task, job and job-worker rows written through the ORM (new jobs' tasks, failures, blocklists, API
    changes) may change the queue: move the epoch (farm.store.states.transition moves it for status changes)."""
    for obj in itertools.chain(session.new, session.dirty, session.deleted):
        if isinstance(obj, _WATCHED):
            QUEUE_EPOCH.move(session)
            return


@event.listens_for(Session, "after_commit")
def _committed(session) -> None:
    if session.info.pop("queue_changed", False):
        QUEUE_EPOCH.move()


@event.listens_for(Session, "after_rollback")
def _rolled_back(session) -> None:
    session.info.pop("queue_changed", None)


class ProgressWatch:
    """Leases need progress: a heartbeat keeps a lease only while its task makes progress.

    Remembers when each live lease ((task, attempt): a new attempt starts afresh) last made progress (its
    lease, its inputs fetched, a frame or an image done: a PROGRESS whose count grew) and how long a unit
    of each job usually takes on the coordinator's clock (the median of its last 64 accepted units). A lease
    with no progress for longer than its job allows (:meth:`stalled`) is not renewed; the sweep then finds
    it expired and hands the task to another worker. In memory only: after a restart every lease counts from
    the first heartbeat seen, which errs towards keeping it."""

    def __init__(self):
        self.last: dict[tuple[int, int], float] = {}   # (task, attempt) → when it last made progress
        self.units: dict[int, list[float]] = {}        # job id → its last accepted units' seconds
        self.stalls: set[tuple[int, int]] = set()      # leases left to run out for want of progress

    def progressed(self, task, done: int, now: float) -> bool:
        """Note a PROGRESS of ``task`` reporting ``done`` units; True when it is progress (renew the lease)."""
        key = (task.id, task.attempt)
        if done > (task.progress_done or 0) or key not in self.last:
            self.last[key] = now
            return True
        return False

    def stalled(self, task, now: float, claim: float = 1.0) -> bool:
        """Whether ``task``'s lease has gone without progress for longer than its job allows: the job's own
        ``time_limit`` a frame when it sets one, else LEASE_STALL_FACTOR × its median unit (at least
        LEASE_STALL_MIN), else — no frame of the job measured yet — LEASE_STALL_SECONDS divided by how many
        times the yardstick speed its worker claims (``claim``, when above 1; at least LEASE_STALL_MIN):
        a worker that says it is 10⁶ times faster has its own word held against it. Marks it, for
        :meth:`take_stall`."""
        key = (task.id, task.attempt)
        since = self.last.get(key)
        if since is None:  # no progress seen yet (or a coordinator restart): count from its lease
            if len(self.last) > 100_000:
                self.last.clear()
            since = self.last[key] = getattr(task, "started_at", 0.0) or now
        spec = task.spec if isinstance(task.spec, dict) else {}
        limit = (spec.get("settings") or {}).get("time_limit")
        if not (type(limit) in (int, float) and limit > 0):
            times = self.units.get(task.job_id)
            limit = max(C.LEASE_STALL_MIN, C.LEASE_STALL_SECONDS / max(1.0, claim)) if not times else max(
                C.LEASE_STALL_MIN, C.LEASE_STALL_FACTOR * sorted(times)[len(times) // 2])
        if now - since <= limit:
            return False
        if len(self.stalls) > 100_000:
            self.stalls.clear()
        self.stalls.add(key)
        return True

    def take_stall(self, task) -> bool:
        """Whether ``task``'s lease ran out because it stalled (once: the mark is removed)."""
        key = (task.id, task.attempt)
        if key in self.stalls:
            self.stalls.discard(key)
            return True
        return False

    def finished(self, task, seconds: float | None = None) -> None:
        """``task``'s lease ended; ``seconds``: it was accepted after that many coordinator seconds."""
        self.last.pop((task.id, task.attempt), None)
        if seconds:
            if len(self.units) > 10_000:
                self.units.clear()
            times = self.units.setdefault(task.job_id, [])
            times.append(seconds / max(1, task.progress_total or 1))
            del times[:-64]
