"""How a lease ends without a result: a worker's FAILED, an invalid result, a lost lease, a failed job.

The coordinator owns a :class:`Failures` and hands it the core it needs (:class:`FailureCore`): the
connections, counters and verifier, and the ends of an attempt on the core's side (lease book, progress
watch, slot). Every method runs on the coordinator's thread inside its step's transaction. Invariants:

* a failure the worker marks "not retryable" (the scene's fault) is a stranger's word: it ends the task
  only when a trusted worker says it, a second worker failed the task too, or nobody else could try it;
  otherwise the task goes to another worker first (one hostile worker must not fail any job it is leased);
* what a failure or a loss spends of the task's attempts is :mod:`farm.core.attempts`'s policy;
* a task fails for good only through :meth:`Failures.task_failed`, and its job once more than
  ``JOB_MAX_FAILED_FRACTION`` of its tasks failed; a failed job's live leases are ended and cancelled
  even when their worker is offline;
* :meth:`Failures.lose` of a lease that already ended in this step does nothing (its job failed or was
  canceled by an earlier loss of the same worker).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Protocol

from sqlmodel import Session, select

from common import protocol as P
from common.logs import ctx
from farm import constants as C
from farm.core import attempts
from farm.core.scheduler import Conn, fits
from farm.kinds import probe as probes
from farm.store.models import Job, JobWorker, Task, Worker
from farm.store.states import TASK_LEASED, JobStatus, TaskStatus, transition
from farm.verify import reputation as R
from farm.verify.verifier import Verifier, is_check

log = logging.getLogger("farm.core.coordinator")

Outgoing = list[tuple[bytes, Any]]
LEASED = tuple(s.value for s in TASK_LEASED)


class FailureCore(Protocol):
    """What :class:`Failures` needs of the coordinator (:class:`farm.core.coordinator.Coordinator`)."""
    conns: dict[bytes, Conn]
    by_worker: dict[str, bytes]
    stats: defaultdict[str, int]
    verifier: Verifier

    def end_attempt(self, s: Session, task: Task, outcome: str, error: str, now: float) -> None:
        """End ``task``'s current attempt on the core's side (lease book, progress watch) and its row."""

    def freed(self, conn: Conn, task_id: int) -> None:
        """A lease of ``conn`` ended on the coordinator's side: its slot is free again."""

    def evidence(self, s: Session, w: Worker, kind: str, now: float, job_id: int | None = None,
                 task_id: int | None = None, detail: str = "") -> None:
        """Record reputation evidence about ``w``."""

    def job_changed(self, s: Session, job: Job, now: float) -> None:
        """Tell the job kinds' listeners that ``job`` changed status."""

    def request_assignment(self) -> None:
        """Run an assignment round at the end of this step."""


class Failures:
    def __init__(self, core: FailureCore):
        self.core = core

    def someone_else_for(self, s: Session, task: Task, job: Job | None) -> bool:
        """Whether a connected worker that has not failed ``task`` may run it (its runtime, not blocked)."""
        for c in self.core.conns.values():
            if c.worker_id in task.failed_workers or not fits(task.kind, c, task.spec):
                continue
            jw = s.get(JobWorker, (task.job_id, c.worker_id)) if job is not None else None
            if jw is None or not jw.blocked:
                return True
        return False

    def fail(self, s: Session, task: Task, worker_id: str, reason: str, retryable: bool, now: float,
              out: Outgoing, evidence: str = "failure") -> None:
        log.info("task failed (%s): %s", "retryable" if retryable else "final", reason[:300],
                 extra=ctx(task.job_id, task.id, task.attempt, worker_id))
        self.core.end_attempt(s, task, "failed", reason, now)
        job = s.get(Job, task.job_id)
        attempts.count_failure(s, task, worker_id)
        # an unreadable or oversized result is the worker's doing, never the scene's: it costs the worker (and
        # blocks it from the job at JOB_WORKER_FAILURE_LIMIT), not the task's budget — sybils sending bombs
        # must not fail the job (only the hard cap ends such a task)
        worker_fault = evidence == "invalid_result"
        w = s.get(Worker, worker_id)
        if w:
            w.tasks_failed += 1
            if retryable:  # the worker's trouble; a non-retryable failure is the scene's fault
                self.core.evidence(s, w, evidence, now, task.job_id, task.id, reason[:200])
            s.add(w)
        task.failed_workers = sorted(set(task.failed_workers) | {worker_id})
        task.error = reason
        task.worker_id, task.lease_expires = None, None
        # "the scene's fault" (not retryable) is a stranger's word: it ends the task when a trusted worker
        # says it, when a second worker failed the task too, or when no other worker could try it; else the
        # task goes to another worker first (one hostile worker must not fail any job it is leased)
        scene_fault = not retryable and (
            (w is not None and R.at_least(w.tier, R.Tier.trusted)) or len(task.failed_workers) >= 2
            or not self.someone_else_for(s, task, job))
        if not retryable and not scene_fault:
            self.core.stats["scene_faults_doubted"] += 1
        final = attempts.failed_for_good(s, task, scene_fault, worker_fault)
        if final and is_check(task):
            self.core.verifier.check_failed(s, task, reason, now)
        elif final:
            self.task_failed(s, task, job, reason, f"task {task.index} failed: {reason}", worker_id, now, out)
        else:
            transition(s, task, TaskStatus.queued, reason=f"retry after: {reason}", worker_id=worker_id,
                       attempt=task.attempt, now=now)
            self.core.request_assignment()

    def task_failed(self, s: Session, task: Task, job: Job, reason: str, job_reason: str, worker_id: str | None,
                     now: float, out: Outgoing) -> None:
        """Fail ``task`` for good; fail its job once more than JOB_MAX_FAILED_FRACTION of its tasks failed (at
        once when it is the job's probe render: the scene cannot be rendered, farm.kinds.probe)."""
        transition(s, task, TaskStatus.failed, reason=reason, worker_id=worker_id, attempt=task.attempt, now=now)
        if probes.is_probe(task, job):
            self.fail_job(s, job, probes.fail(s, job, reason), now, out)
            return
        job.tasks_failed += 1
        s.add(job)
        if job.tasks_failed > C.JOB_MAX_FAILED_FRACTION * job.tasks_total:
            self.fail_job(s, job, job_reason, now, out)

    def fail_job(self, s: Session, job: Job, reason: str, now: float, out: Outgoing) -> None:
        if job.status not in (JobStatus.probing.value, JobStatus.queued.value, JobStatus.active.value,
                              JobStatus.rejected.value):
            return
        job.error = reason
        for t in s.exec(select(Task).where(Task.job_id == job.id)
                        .where(Task.status.in_([TaskStatus.waiting.value, TaskStatus.queued.value, *LEASED]))):
            if t.status in LEASED:  # end the attempt even when its worker is offline (not reconnected yet)
                self.core.end_attempt(s, t, "canceled", "the job failed", now)
                if t.worker_id in self.core.by_worker:
                    out.append((self.core.by_worker[t.worker_id], P.Cancel(t.id, t.attempt, "the job failed")))
            t.worker_id, t.lease_expires = None, None
            transition(s, t, TaskStatus.canceled, reason="the job failed", attempt=t.attempt, now=now)
        transition(s, job, JobStatus.failed, reason=reason, now=now)
        self.core.job_changed(s, job, now)

    def lose(self, s: Session, task: Task, now: float, reason: str, out: Outgoing) -> None:
        """The lease of ``task`` ended without a result: requeue it (or fail it when out of attempts)."""
        if task.status not in LEASED:  # ended already in this step: its job failed or was canceled by an
            return                     # earlier loss of the same worker (found with prefetching: a 500)
        worker_id = task.worker_id
        log.info("lease lost: %s", reason, extra=ctx(task.job_id, task.id, task.attempt, worker_id))
        self.core.end_attempt(s, task, "lost", reason, now)
        task.worker_id, task.lease_expires = None, None
        self.core.stats["lost"] += 1
        w = s.get(Worker, worker_id) if worker_id else None
        if w:
            self.core.evidence(s, w, "lease_lost", now, task.job_id, task.id, reason[:200])
        ident = self.core.by_worker.get(worker_id)
        if ident in self.core.conns:  # still connected (lease expired): it does not hold the task, so the slot is free
            self.core.freed(self.core.conns[ident], task.id)
        # leases that never started, or were lost by workers since blocked from the job, spend only the
        # hard cap (farm/core/attempts.py)
        final = attempts.lost_for_good(s, task)
        if final and is_check(task):
            transition(s, task, TaskStatus.queued, reason=f"lease lost: {reason}", worker_id=worker_id,
                       attempt=task.attempt, now=now)
            self.core.verifier.check_failed(s, task, f"lost {task.attempt} leases: {reason}", now)
        elif final:
            self.task_failed(s, task, s.get(Job, task.job_id), f"lost {task.attempt} leases: {reason}",
                              f"task {task.index} lost {task.attempt} leases", worker_id, now, out)
        else:
            transition(s, task, TaskStatus.queued, reason=f"lease lost: {reason}", worker_id=worker_id,
                       attempt=task.attempt, now=now)
        self.core.request_assignment()

