"""The creator's review of a rendered job: approve it (which releases the payouts) or reject frames of it
(which re-renders them). Used by the HTTP API; both run on the coordinator's thread (``broker.call``),
because rejecting changes task rows, which only that thread writes.

Invariants:

* only the job's creator reviews (not even the admin approves for them: the escrow would refuse);
* approve is idempotent: approving an approved or paid job changes nothing and answers the same;
* a rejected task goes back to ``queued`` through :func:`farm.store.states.transition`, its accepting attempt is
  marked ``rejected`` (so it is never paid) and its outputs are dropped (the re-render replaces them);
  the job goes ``rendered → rejected``, and the coordinator takes it ``rejected → active → rendered``;
* the job's :class:`~farm.store.ledger_models.Settlement` is told in the same transaction: a new payout list is
  needed, and the dispute must be recorded on chain.
"""
from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import delete
from sqlmodel import Session, select

from farm.kinds import frames as splitter
from farm.kinds import jobs
from farm.kinds.jobs import JobError
from farm.store.db import session as new_session
from farm.store.ledger_models import Settlement
from farm.store.models import Attempt, Job, Output, Task, TaskDep, User
from farm.store.states import JobStatus, TaskStatus, transition

MAX_REASON = 1000


def _own_job(s: Session, job_id: int, user: User) -> Job:
    job = jobs.get_job(s, job_id, user)
    if job.owner_id != user.id:
        raise JobError(f"only the creator of job {job_id} can review it (the escrow only accepts their "
                       "approval): use the creator's token", 403)
    return job


def approve_job(engine, job_id: int, user: User) -> dict[str, Any]:
    """Approve a rendered job. Returns the job's view."""
    with new_session(engine) as s:
        job = _own_job(s, job_id, user)
        if job.status in (JobStatus.approved.value, JobStatus.paid.value):
            return jobs.job_view(s, job)
        if job.status != JobStatus.rendered.value:
            raise JobError(f"job {job_id} is {job.status}: only a rendered job can be approved"
                           + (" (wait until its re-rendered frames are done)" if job.status in
                              (JobStatus.rejected.value, JobStatus.active.value) else ""), 409)
        transition(s, job, JobStatus.approved, reason="approved by the creator")
        s.commit()
        return jobs.job_view(s, job)


def parse_frames(frames: list[int] | str) -> list[int]:
    if isinstance(frames, str):
        try:
            return splitter.parse_frames(frames)
        except ValueError as exc:
            raise JobError(str(exc)) from None
    return sorted({int(f) for f in frames})


def reject_job(engine, job_id: int, user: User, frames: list[int] | str, reason: str,
               now: float | None = None) -> dict[str, Any]:
    """Reject ``frames`` of a rendered job: their tasks are re-queued for a new render. A job already
    in ``rejected`` (re-rendering) may have more frames rejected. Returns the job's view."""
    now = time.time() if now is None else now
    reason = (reason or "").strip()[:MAX_REASON] or "no reason given"
    wanted = parse_frames(frames)
    if not wanted:
        raise JobError("name the frames to re-render (for example 3,7-9)")
    with new_session(engine) as s:
        job = _own_job(s, job_id, user)
        if job.status not in (JobStatus.rendered.value, JobStatus.rejected.value):
            raise JobError(f"job {job_id} is {job.status}: only a rendered job can be rejected", 409)
        outs = s.exec(select(Output).where(Output.job_id == job.id).where(Output.final)
                      .where(Output.frame.in_(wanted))).all()
        missing = sorted(set(wanted) - {o.frame for o in outs})
        if missing:
            raise JobError(f"job {job_id} has no rendered frame {', '.join(map(str, missing[:20]))}: "
                           "see GET /api/jobs/{id}/outputs for its frames", 422)
        task_ids = sorted({o.task_id for o in outs})
        tasks = s.exec(select(Task).where(Task.id.in_(task_ids))).all()
        if s.exec(select(TaskDep).where(TaskDep.task_id.in_(task_ids))).first():
            raise JobError("these frames were assembled from tiles; rejecting tiled frames is not supported "
                           "yet: submit the frames again as a new job", 422)
        requeued = 0
        for task in tasks:
            if task.status != TaskStatus.accepted.value:
                continue  # already re-rendering
            att = s.exec(select(Attempt).where(Attempt.task_id == task.id)
                         .where(Attempt.attempt == task.attempt)).first()
            if att is not None:
                att.outcome, att.error = "rejected", f"rejected by the creator: {reason}"[:2000]
                s.add(att)
            s.exec(delete(Output).where(Output.task_id == task.id))
            task.error = f"rejected by the creator: {reason}"[:2000]
            task.progress_done = 0
            task.render_seconds = 0.0
            transition(s, task, TaskStatus.queued, reason=f"creator rejected frames: {reason}",
                       attempt=task.attempt, now=now)
            job.tasks_accepted -= 1
            requeued += 1
        if job.status == JobStatus.rendered.value:
            transition(s, job, JobStatus.rejected, reason=f"frames {_fmt(wanted)} rejected: {reason}", now=now)
        s.add(job)
        st = s.get(Settlement, job.id)
        if st is not None:
            st.needs_payouts = True
            st.reject_pending = True
            st.reject_reason = json.dumps({"frames": wanted, "reason": reason}, sort_keys=True)
            st.updated_at = now
            s.add(st)
        s.commit()
        view = jobs.job_view(s, job)
        view["requeued_tasks"] = requeued
        return view


def _fmt(frames: list[int]) -> str:
    return ",".join(map(str, frames[:50])) + ("…" if len(frames) > 50 else "")
