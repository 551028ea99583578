"""What a task's attempts have spent: the retry policy of the coordinator, as queries over Attempt rows.

A task has ``TASK_MAX_ATTEMPTS`` attempts for trouble that may be the scene's (failures, lost leases of
workers in good standing), and a hard cap of ``4 × TASK_MAX_ATTEMPTS`` attempts whatever happened.
Invariants (each found by an attack or a crash test, see tests/core):

* an attempt handed back (RELEASE: its owner paused the worker) spends nothing, not even the hard cap;
* a lease lost before its worker showed progress never started (a prefetched task of a worker that died
  with its current one): it spends only the hard cap;
* a lease lost by a worker since blocked from the job (a staller, a worker that failed the job too
  often) is that worker's fault, not the task's: it spends only the hard cap, so sybils cannot burn a
  task's attempts until its job fails;
* an invalid result (a bomb, garbage) is the worker's fault: it spends only the hard cap;
* past ``RELEASES_PER_JOB`` hand-backs in one job a worker takes none of its tasks (releases are free, so
  they must stay bounded), and a staller that never finished a frame of a job is off the job.

Coordinator thread only, inside its step's transaction; nothing here talks to a socket.
"""
from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, select

from farm import constants as C
from farm.store.models import Attempt, JobWorker, Task

HARD_CAP = 4 * C.TASK_MAX_ATTEMPTS


def current(s: Session, task: Task) -> Attempt | None:
    """The Attempt row of ``task``'s current attempt."""
    return s.exec(select(Attempt).where(Attempt.task_id == task.id)
                  .where(Attempt.attempt == task.attempt)).first()


def end(s: Session, task: Task, outcome: str, error: str, now: float) -> None:
    """End ``task``'s current attempt with ``outcome`` (once: an attempt already ended keeps its outcome)."""
    att = current(s, task)
    if att and att.outcome == "leased":
        att.outcome, att.ended_at, att.error = outcome, now, error[:2000]
        s.add(att)


def _count(s: Session, task: Task, *where) -> int:
    return s.exec(select(func.count()).select_from(Attempt).where(Attempt.task_id == task.id).where(*where)).one()


def released(s: Session, task: Task) -> int:
    """Attempts of ``task`` handed back by paused workers."""
    return _count(s, task, Attempt.outcome == "released")


def unstarted(s: Session, task: Task) -> int:
    """Leases of ``task`` lost before their worker showed progress on them."""
    return _count(s, task, Attempt.outcome == "lost", Attempt.progressed.is_(False))


def _lost_by_blocked(s: Session, task: Task) -> int:
    """Started leases of ``task`` lost by workers since blocked from its job."""
    theirs = (JobWorker.job_id == Attempt.job_id) & (JobWorker.worker_id == Attempt.worker_id)
    return s.exec(select(func.count()).select_from(Attempt).join(JobWorker, theirs)
                  .where(Attempt.task_id == task.id).where(Attempt.outcome == "lost")
                  .where(Attempt.progressed).where(JobWorker.blocked)).one()


def spent_after_loss(s: Session, task: Task) -> int:
    """The attempts ``task`` has spent once its current lease is lost (the current one included)."""
    spent = task.attempt - unstarted(s, task)
    if spent >= C.TASK_MAX_ATTEMPTS and task.attempt - released(s, task) < HARD_CAP:
        spent -= _lost_by_blocked(s, task) + released(s, task)  # counted only when they could decide it
    return spent


def lost_for_good(s: Session, task: Task) -> bool:
    """Whether losing ``task``'s current lease ends the task (out of attempts)."""
    return spent_after_loss(s, task) >= C.TASK_MAX_ATTEMPTS


def failed_for_good(s: Session, task: Task, scene_fault: bool, worker_fault: bool) -> bool:
    """Whether a failure of ``task``'s current attempt ends the task: the scene's fault (as judged by
    the caller), the hard cap, or, unless it was the worker's fault, out of attempts or failed by
    ``TASK_DISTINCT_WORKER_FAILURES`` different workers (``task.failed_workers`` already holds this one)."""
    given_back = released(s, task) if task.attempt >= C.TASK_MAX_ATTEMPTS else 0
    if scene_fault or task.attempt - given_back >= HARD_CAP:
        return True
    return not worker_fault and (task.attempt - given_back >= C.TASK_MAX_ATTEMPTS
                                 or len(task.failed_workers) >= C.TASK_DISTINCT_WORKER_FAILURES)


def _job_worker(s: Session, job_id: int, worker_id: str) -> JobWorker:
    return s.get(JobWorker, (job_id, worker_id)) or JobWorker(job_id=job_id, worker_id=worker_id)


def block_after_releases(s: Session, task: Task, worker_id: str) -> int | None:
    """Block ``worker_id`` from ``task``'s job once it handed back ``RELEASES_PER_JOB`` of its tasks.
    Returns the number handed back when this call blocked it, else None."""
    given_back = s.exec(select(func.count()).select_from(Attempt).where(Attempt.job_id == task.job_id)
                        .where(Attempt.worker_id == worker_id).where(Attempt.outcome == "released")).one()
    if given_back < C.RELEASES_PER_JOB:
        return None
    jw = _job_worker(s, task.job_id, worker_id)
    if jw.blocked:
        return None
    jw.blocked = True
    s.add(jw)
    return given_back


def mark_staller(s: Session, task: Task) -> None:
    """``task``'s worker heart-beat without progress until its lease ran out: not this worker again
    while another can take it (as after a failure), and off the job if it never finished a frame of it
    (a flock of fresh ids must not pass the task round, each sitting on it for a stall limit)."""
    worker_id = task.worker_id
    if not worker_id:
        return
    task.failed_workers = sorted(set(task.failed_workers) | {worker_id})
    finished = s.exec(select(Attempt.id).where(Attempt.job_id == task.job_id).where(Attempt.worker_id == worker_id)
                      .where(Attempt.outcome == "done").limit(1)).first()
    if not finished:
        jw = _job_worker(s, task.job_id, worker_id)
        jw.failures, jw.blocked = jw.failures + 1, True
        s.add(jw)


def count_failure(s: Session, task: Task, worker_id: str) -> JobWorker:
    """One more failure of ``worker_id`` in ``task``'s job; blocked from it at JOB_WORKER_FAILURE_LIMIT."""
    jw = _job_worker(s, task.job_id, worker_id)
    jw.failures += 1
    jw.blocked = jw.failures >= C.JOB_WORKER_FAILURE_LIMIT
    s.add(jw)
    return jw
