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

from sqlalchemy import delete, func
from sqlmodel import Session, select

from farm import constants as C
from farm.kinds import frames as splitter
from farm.kinds import jobs
from farm.kinds.jobs import JobError
from farm.store.db import session as new_session
from farm.store.ledger_models import Settlement
from farm.store.models import Attempt, Event, Job, Output, Task, TaskDep, User
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


def reject_record(frames: list[int] | str, reason: str) -> tuple[list[int], str, str]:
    """(frames, reason, the record of both whose hash the escrow's Reject names): one canonical text, so the
    creator's own wallet signs exactly what the ledger relays."""
    reason = (reason or "").strip()[:MAX_REASON] or "no reason given"
    wanted = parse_frames(frames)
    return wanted, reason, json.dumps({"frames": wanted, "reason": reason}, sort_keys=True)


def reject_job(engine, job_id: int, user: User, frames: list[int] | str, reason: str,
               now: float | None = None, signature: str = "") -> dict[str, Any]:
    """Reject ``frames`` of a rendered job: their tasks are re-queued for a new render. A job already
    in ``rejected`` (re-rendering) may have more frames rejected. ``signature``: the creator's own wallet's
    EIP-712 Reject of this record, checked by the caller. Returns the job's view."""
    now = time.time() if now is None else now
    wanted, reason, record = reject_record(frames, reason)
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
        _check_reject_bounds(s, job, user, sum(t.status == TaskStatus.accepted.value for t in tasks))
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
            st.reject_reason, st.reject_sig = record, signature
            st.updated_at = now
            s.add(st)
        s.commit()
        view = jobs.job_view(s, job)
        view["requeued_tasks"] = requeued
        return view


def standing(s: Session, user_id: int) -> dict[str, Any]:
    """A creator's review record: the frames (tasks) delivered to them and how many they rejected. Part of
    their standing: past :data:`~farm.constants.MAX_CREATOR_REJECT_RATE` they may not reject more."""
    rows = s.exec(select(Attempt.outcome, func.count()).join(Task, Task.id == Attempt.task_id)
                  .join(Job, Job.id == Task.job_id).where(Job.owner_id == user_id).where(Task.check_id.is_(None))
                  .where(Attempt.outcome.in_(["done", "rejected"])).group_by(Attempt.outcome)).all()
    counts = dict(rows)
    rejected, delivered = counts.get("rejected", 0), counts.get("done", 0) + counts.get("rejected", 0)
    return {"frames_delivered": delivered, "frames_rejected": rejected,
            "reject_rate": round(rejected / delivered, 4) if delivered else 0.0,
            "max_reject_rate": C.MAX_CREATOR_REJECT_RATE, "reject_grace_frames": C.REJECT_GRACE_FRAMES}


def _check_reject_bounds(s: Session, job: Job, user: User, new: int) -> None:
    """Refuse a rejection past the bounds (nothing written): reject-and-re-render must not be a way to get
    renders unpaid. Per job: MAX_REJECT_ROUNDS_PER_JOB rounds and MAX_JOB_REJECT_SHARE of its tasks; per
    creator: MAX_CREATOR_REJECT_RATE of what was delivered to them, past a grace of REJECT_GRACE_FRAMES."""
    if new <= 0:
        return
    fix = ("approve the job (cancelling it approves its accepted work too), or ask the farm's operator to "
           "arbitrate: they can re-render frames that are really wrong")
    if job.status == JobStatus.rendered.value:
        rounds = s.exec(select(func.count()).select_from(Event).where(Event.job_id == job.id)
                        .where(Event.kind == "job").where(Event.new == JobStatus.rejected.value)).one()
        if rounds >= C.MAX_REJECT_ROUNDS_PER_JOB:
            raise JobError(f"job {job.id} was sent back for re-rendering {rounds} times already, the most a job "
                           f"may be: {fix}", 409)
    earlier = s.exec(select(func.count()).select_from(Attempt).where(Attempt.job_id == job.id)
                     .where(Attempt.outcome == "rejected")).one()
    if earlier + new > max(1, int(C.MAX_JOB_REJECT_SHARE * job.tasks_total)):  # a one-frame job: its frame
        raise JobError(f"rejecting {new} more tasks would make {earlier + new} of job {job.id}'s {job.tasks_total} "
                       f"rejected, more than the {C.MAX_JOB_REJECT_SHARE:.0%} a job may have: {fix}", 409)
    mine = standing(s, user.id)
    rejected, delivered = mine["frames_rejected"] + new, max(1, mine["frames_delivered"])
    if rejected > C.REJECT_GRACE_FRAMES and rejected / delivered > C.MAX_CREATOR_REJECT_RATE:
        raise JobError(f"you have rejected {mine['frames_rejected']} of the {mine['frames_delivered']} frames "
                       f"delivered to you; {new} more would be {rejected / delivered:.0%}, above the "
                       f"{C.MAX_CREATOR_REJECT_RATE:.0%} a creator may reject: {fix}", 409)


def _fmt(frames: list[int]) -> str:
    return ",".join(map(str, frames[:50])) + ("…" if len(frames) > 50 else "")
