"""Assignment: which queued task goes to which free worker, and the lease that records it.

:class:`Assignment` is owned by :class:`farm.core.coordinator.Coordinator`, which runs a round at the end
of a step when work or capacity may have appeared (:meth:`Assignment.run`). A round reads the head of the
queue (its own :class:`~farm.core.leases.ReadAhead` copy, or the database one priority level at a time),
filters the free workers that may take each task (runtime, tier, blocklist, a check's rules) and lets
:class:`farm.core.scheduler.Scheduler` choose among them; :meth:`Assignment._lease` records the lease (task,
Attempt row, event) in the step's transaction and queues the TASK message. What it needs from its owner is
handed to it explicitly: the step's cached job lookup and the rule for who may run a check.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from sqlalchemy import bindparam, func, or_
from sqlmodel import Session, select

from common import protocol as P
from common.logs import ctx
from farm import constants as C
from farm.core.leases import COLUMNS, ReadAhead, TaskRow
from farm.core.scheduler import RUNTIME_FOR_KIND, Conn, Scheduler, fits
from farm.store.models import Attempt, Job, JobWorker, Task
from farm.store.states import JOB_SCHEDULABLE, QUEUE_EPOCH, JobStatus, TaskStatus, transition
from farm.store.writes import add_row
from farm.verify import reputation as R
from farm.verify.reputation import Tier
from farm.verify.verifier import is_check, public_spec

log = logging.getLogger("farm.core.coordinator")

Outgoing = list[tuple[bytes, Any]]

# the task columns the assignment reads (a TaskRow), then the job's id
_NQ = len(COLUMNS)


# Statements of the hot path, built once (building one costs about as much as running it).
_QUEUED = (select(*COLUMNS, Job.id).select_from(Task).join(Job, Job.id == Task.job_id)
           .where(Task.status == TaskStatus.queued.value)
           .where(or_(Job.status.in_([x.value for x in JOB_SCHEDULABLE]), Task.check_id.is_not(None),
                      # a probing job's probe render (farm.kinds.probe), before the job is quoted
                      Task.probe & (Job.status == JobStatus.probing.value))))
_TOP = select(func.max(Task.priority)).where(Task.status == TaskStatus.queued.value)
_NEXT_LEVEL = _TOP.where(Task.priority < bindparam("p"))
_WINDOW_TOP = (_QUEUED.where(Task.priority == _TOP.scalar_subquery()).order_by(Task.job_id, Task.index)
               .limit(bindparam("n")))
_WINDOW_AT = _QUEUED.where(Task.priority == bindparam("p")).order_by(Task.job_id, Task.index).limit(bindparam("n"))
_WINDOW_BELOW = (_QUEUED.where(Task.priority < bindparam("p")).order_by(Task.priority.desc(), Task.job_id, Task.index)
                 .limit(bindparam("n")))
_BLOCKED = (select(JobWorker.job_id, JobWorker.worker_id)
            .where(JobWorker.job_id.in_(bindparam("jobs", expanding=True))).where(JobWorker.blocked))


class Assignment:
    """Assignment rounds and leases (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, job_of: Callable[[Session, int], Job | None],
                 may_take_check: Callable[[Task, Conn], bool]):
        self.scheduler = scheduler
        self.ahead = ReadAhead()  # the head of the queue: rounds need not read it again
        self._job = job_of  # the step's job lookup (loaded, cached from the last step, or read)
        self._may_take_check = may_take_check  # whether a worker may run a check task (never the checked one)

    def run(self, s: Session, conns: Iterable[Conn], now: float, out: Outgoing) -> None:
        """Lease queued tasks to the free slots of ``conns``, in priority-then-FIFO order."""
        free = [c for c in conns if c.free > 0]
        capacity = sum(c.free for c in free)
        if not capacity:
            return
        # Usually most queued tasks fit most workers: a window a little larger than the free slots fills
        # them. Only when it does not, look at the wider window (and then deeper, per worker).
        first = capacity + capacity // 4 + 1
        rows = self._window(s, first)
        left = self._assign_rows(s, rows, free, capacity, now, out)
        if not left or len(rows) < first:
            return
        limit = capacity * 4 + 16
        rows = self._window(s, limit)
        left = self._assign_rows(s, rows, free, left, now, out)
        if left and len(rows) == limit:  # the window was full of tasks these workers may not take: look further
            for conn in [c for c in free if c.free > 0]:
                self._assign_deeper(s, conn, now, out)

    def _window(self, s: Session, limit: int) -> list[tuple[TaskRow, Job]]:
        """The first ``limit`` queued tasks, by priority then FIFO, with their jobs: from the read-ahead
        copy while it is current, else read (ReadAhead.SIZE rows or more at once)."""
        ahead = self.ahead
        if not ahead.covers(limit):
            epoch, want = QUEUE_EPOCH.value, max(limit, ReadAhead.SIZE)
            rows = self._read_window(s, want)
            job_ids = list({j for _, j in rows})
            blocked = set(s.exec(_BLOCKED, params={"jobs": job_ids}).all()) if job_ids else set()
            ahead.fill(rows, blocked, want, epoch)
        jobs: dict[int, Job | None] = {}  # a job that is gone is looked up once
        out = []
        for row, jid in ahead.first(limit):
            job = jobs[jid] if jid in jobs else jobs.setdefault(jid, self._job(s, jid))
            if job is not None:
                out.append((row, job))
        return out

    @staticmethod
    def _read_window(s: Session, limit: int) -> list[tuple[TaskRow, int]]:
        """Read the first ``limit`` queued tasks (and their job ids). One priority at a time: within one,
        the claim index (status, priority, job_id, index) gives the order, so the database reads ``limit``
        rows; ``ORDER BY priority DESC, job_id, index`` mixes directions and sorts every queued task."""
        def read(stmt, **params):
            return [(TaskRow(*r[:_NQ]), r[_NQ]) for r in s.exec(stmt, params=params).all()]
        rows = read(_WINDOW_TOP, n=limit)
        if len(rows) == limit:
            return rows
        level = rows[0][0].priority if rows else s.exec(_TOP).one()
        for _ in range(8):  # a few more levels; past them, one sorted query for the rest
            level = s.exec(_NEXT_LEVEL, params={"p": level}).one() if level is not None else None
            if level is None or len(rows) >= limit:
                return rows
            rows += read(_WINDOW_AT, p=level, n=limit - len(rows))
        if len(rows) < limit:
            rows += read(_WINDOW_BELOW, p=level, n=limit - len(rows))
        return rows

    def _assign_rows(self, s: Session, rows: list[tuple[TaskRow, Job]], free: list[Conn], left: int, now: float,
                     out: Outgoing) -> int:
        """Lease ``rows`` in order to the workers in ``free`` that may take them; returns the free slots left."""
        if not rows:
            return left
        blocked = self.ahead.blocked
        pools: dict[tuple, list[Conn]] = {}  # the workers that may take tasks of one job, kind and model
        for task, job in rows:
            probe = bool(task.spec.get("only_worker"))  # a probe may re-check a job its worker is blocked in
            key = None if is_check(task) else (job.id, task.kind, task.spec.get("model_hash"), probe)
            pool = pools.get(key) if key else None
            if pool is None:
                pool = [c for c in free if (probe or (job.id, c.worker_id) not in blocked)
                        and self._may_take(task, job, c)]
            pool = [c for c in pool if c.free > 0]
            if key:
                pools[key] = pool
            failed = task.failed_workers
            candidates = [c for c in pool if c.worker_id not in failed] if failed else pool
            candidates = candidates or pool
            # a slot that would render the task now before a lease that would wait behind another render
            # (prefetch): an idle worker must not watch an established one hold the last tasks in its
            # queue (found by the cheater suite: new workers got no task to be checked on; it also
            # lengthens the makespan)
            idle = [c for c in candidates if len(c.held.leases) < c.held.slots]
            conn = self.scheduler.choose(task.inputs, idle or candidates, task.spec.get("model_hash"))
            if conn is None:
                continue
            self._lease(s, task, job, conn, now, out)
            left -= 1
            if not left:
                break
        return left

    @staticmethod
    def _queued():
        """Queued tasks of schedulable jobs, queued checks (a probe may re-check a finished job), and the probe
        renders of probing jobs."""
        return _QUEUED

    def _may_take(self, task: Task, job: Job, conn: Conn) -> bool:
        """Whether ``conn`` may run ``task``: its runtimes fit, its tier is high enough for the job (and
        not on probation), and for a check it is not the worker checked."""
        if not fits(task.kind, conn, task.spec):
            return False
        if is_check(task):
            return self._may_take_check(task, conn)
        return conn.tier != Tier.probation and R.at_least(conn.tier, job.spec.get("min_tier"))

    def _assign_deeper(self, s: Session, conn: Conn, now: float, out: Outgoing) -> None:
        """Lease to ``conn`` the first queued tasks that it may take (kind fits, job not blocklisted),
        however deep in the queue: a blocklisted or specialised worker must not starve behind a big job."""
        runtimes = conn.capabilities.get("runtimes", ["blender"])
        kinds = sorted({k for k, r in RUNTIME_FOR_KIND.items() if r in runtimes} | set(runtimes))
        blocked = select(JobWorker.job_id).where(JobWorker.worker_id == conn.worker_id).where(JobWorker.blocked)
        for r in s.exec(self._queued().where(Task.kind.in_(kinds)).where(Task.job_id.notin_(blocked))
                        .order_by(Task.priority.desc(), Task.job_id, Task.index).limit(conn.free * 4 + 16)).all():
            task, job = TaskRow(*r[:_NQ]), self._job(s, r[_NQ])
            if conn.free > 0 and self._may_take(task, job, conn):  # kind fits; the model may not
                self._lease(s, task, job, conn, now, out)
                self.ahead.clear()  # it may hold this task

    def _lease(self, s: Session, task: TaskRow, job: Job, conn: Conn, now: float, out: Outgoing) -> None:
        # read in an earlier step, maybe: leased only if still queued at the attempt read (else StaleRow)
        s.writes.fence(Task, task.id, {"status": TaskStatus.queued.value, "attempt": task.attempt})
        self.ahead.leased(task.id)
        attempt = task.attempt + 1
        transition(s, task, TaskStatus.assigned, worker_id=conn.worker_id, attempt=attempt, now=now,
                   values=dict(attempt=attempt, worker_id=conn.worker_id, lease_expires=now + C.LEASE_SECONDS,
                               progress_done=0))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("leased %s task", task.kind, extra=ctx(task.job_id, task.id, task.attempt, conn.worker_id))
        add_row(s, Attempt, task_id=task.id, job_id=task.job_id, attempt=task.attempt, worker_id=conn.worker_id,
                started_at=now)
        if job.status in (JobStatus.queued.value, JobStatus.rejected.value) and not is_check(task):
            transition(s, job, JobStatus.active, reason="first task leased", now=now)
        task.started_at = now
        s.info.setdefault("leased", []).append(task)  # into the lease book once this step commits
        conn.free -= 1
        conn.held.add(task.id, attempt)
        conn.held_blobs.update(task.inputs)
        conn.note_model(task.spec.get("model_hash"))
        spec = public_spec(task.spec) if task.check_id is not None else task.spec  # never say it is a check
        out.append((conn.identity, P.Task(task.id, task.attempt, task.job_id, C.LEASE_SECONDS, task.kind,
                                          spec, list(task.inputs))))
