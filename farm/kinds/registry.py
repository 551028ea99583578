"""Job kinds behind one registry: how a job of each kind is planned from a creator's request, and how kinds
react to other jobs' status changes.

* :data:`CREATORS`: kind → ``create(session, owner, blobs, request) -> Job``, which validates the request
  (raising :class:`farm.kinds.jobs.JobError` with the fix), plans its tasks and stores them in the session;
  the web API looks a kind up here and knows nothing of frames, tiles or prompts.
* :data:`JOB_STATUS_LISTENERS`: hooks the coordinator's core calls after it changed a job's status, in its
  thread and transaction (``listener(session, job, now) -> bool``, True when tasks were queued, so that an
  assignment round follows); :data:`SWEEPS`: the same for changes made elsewhere, run every sweep. Chains
  live here: an img2img job waits for its source job's frames to be approved.

A new kind adds its planner module to this package and one line to each table; the core does not change.
"""
from __future__ import annotations

from typing import Any, Callable

from sqlmodel import Session

from farm.kinds import diffusion, jobs
from farm.store.blobs import BlobStore
from farm.store.models import Event, Job, User
from farm.store.states import JobStatus

Creator = Callable[[Session, User, BlobStore, dict[str, Any]], Job]
JobListener = Callable[[Session, Job, float], bool]

CREATORS: dict[str, Creator] = {
    "blender": jobs.create_blender_job,  # frames, chunks, tiles, video (farm.kinds.frames, farm.kinds.tiles)
    "diffusion": lambda session, owner, blobs, req: diffusion.create_diffusion_job(session, owner, req, blobs),
}

JOB_STATUS_LISTENERS: tuple[JobListener, ...] = (
    diffusion.on_job_status,  # img2img jobs over a render fail when it fails (and start once it is approved)
)

Sweep = Callable[[Session, float], bool]
SWEEPS: tuple[Sweep, ...] = (
    diffusion.release_ready,  # img2img jobs start from their source's frames once it is approved, anywhere
)
"""Reactions the core runs at every sweep, in its transaction (``sweep(session, now) -> bool``, True when
tasks were queued): for changes made off the coordinator's thread (approval by the web page or the
review window), which no status listener sees."""


def create_job(kind: str, session: Session, owner: User, blobs: BlobStore, req: dict[str, Any],
               hold_for_deposit: bool = False) -> Job:
    """Plan and store a job of ``kind`` (one of :data:`CREATORS`). ``hold_for_deposit``: the farm takes
    payments and this creator has no credit line, so the new job starts ``funding``: none of its tasks is
    leased before the ledger has confirmed its deposit in escrow (farm.payments.ledger)."""
    create = CREATORS.get(kind)
    if create is None:
        raise jobs.JobError(f"unknown job kind {kind!r}: choose one of {', '.join(sorted(CREATORS))}")
    job = create(session, owner, blobs, req)
    if hold_for_deposit:  # a job created now (its creation event is not written yet), not a retried submit's
        for ev in list(session.new):
            if isinstance(ev, Event) and ev.kind == "job" and ev.job_id == job.id and not ev.old:
                job.status = JobStatus.funding.value
                ev.new, ev.detail = job.status, f"{ev.detail}; leased once its deposit is confirmed in escrow"
                session.add(job)
    return job
