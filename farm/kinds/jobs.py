"""Creator-facing operations on jobs: create (split into tasks), describe, list outputs, cancel.

Used by the HTTP API. Each function works inside the caller's session; the caller commits. Creation is
idempotent per (owner, client request id) so that a retried submit never queues a job twice.
"""
from __future__ import annotations

import io
import time
import zlib
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, insert
from sqlmodel import Session, select

from common.hashing import check_sha
from farm import constants as C
from farm.kinds import frames as splitter
from farm.kinds import projects, tiles
from farm.store.blobs import BlobStore
from farm.store.models import Attempt, Check, Event, Job, Output, Task, TaskDep, User
from farm.store.states import QUEUE_EPOCH, TASK_LEASED, JobStatus, TaskStatus, transition, transition_tasks

BLEND_MAGIC = (b"BLENDER", b"\x28\xb5\x2f\xfd", b"\x1f\x8b")  # plain, zstd (Blender ≥ 3.0), gzip
BLEND_PEEK_BYTES = 1 << 20
"""Compressed bytes read to find the .blend header inside a zstd or gzip scene (it is in the first block)."""


def blend_problem(path: Path) -> str:
    """Why the file at ``path`` is not a .blend ("" when it is one, as far as its header tells). A zstd or
    gzip file is decompressed only up to the 7 bytes of the header inside, from at most BLEND_PEEK_BYTES of
    input: a decompression bomb costs nothing here (the worker's Blender opens the scene, not us)."""
    with open(path, "rb") as f:
        head = f.read(len(BLEND_MAGIC[0]))
        if head.startswith(BLEND_MAGIC[0]):
            return ""
        kind = "zstd" if head.startswith(BLEND_MAGIC[1]) else "gzip" if head.startswith(BLEND_MAGIC[2]) else ""
        if not kind:
            return "no Blender, zstd or gzip header"
        f.seek(0)
        data = f.read(BLEND_PEEK_BYTES)
    try:
        if kind == "gzip":
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, len(BLEND_MAGIC[0]))
        else:
            import zstandard  # a dependency of bpy

            reader, inner = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)), b""
            while len(inner) < len(BLEND_MAGIC[0]) and (more := reader.read(len(BLEND_MAGIC[0]) - len(inner))):
                inner += more
    except Exception:  # zlib.error, zstandard.ZstdError: damaged or truncated
        return f"a damaged {kind} stream"
    return "" if inner.startswith(BLEND_MAGIC[0]) else f"{kind}-compressed, but not a compressed .blend"


class JobError(ValueError):
    """A request about a job that cannot be honoured; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def create_blender_job(session: Session, owner: User, blobs: BlobStore, req: dict[str, Any]) -> Job:
    """Validate a frame-job request, store the job and its tasks. Raises JobError before writing anything."""
    scene = req.get("scene_sha256", "")
    project = None
    if req.get("project") is not None:
        try:
            project, project_bytes = projects.check(blobs, req["project"], scene)
        except projects.ProjectRefused as exc:
            raise JobError(str(exc), exc.status) from None
        scene = project.files[project.scene]
    try:
        check_sha(scene)
    except ValueError as exc:
        raise JobError(f"scene_sha256: {exc}") from None
    if not blobs.has(scene):
        raise JobError(f"scene blob {scene} is not uploaded: upload it first (POST /api/blobs/missing, "
                       "then PUT /api/blobs/{sha256})", 409)
    problem = blend_problem(blobs.path(scene))
    if problem:
        raise JobError(f"the scene is not a .blend file ({problem}): save it from Blender (File > Save, "
                       "compression on or off) and submit the .blend itself, not an archive of it")
    client_key = str(req.get("client_key") or "")[:100]
    existing = job_for_key(session, owner, client_key)
    if existing:
        return existing
    try:
        settings = splitter.render_settings(req.get("format", "PNG"), req.get("color_depth"),
                                            req.get("samples"), req.get("resolution_percent"),
                                            req.get("resolution"), req.get("time_limit"), req.get("passes"))
        chunk = int(req.get("chunk", 1))
        plans = tiles.plan_job(scene, str(req.get("frames", "")), chunk, settings, req.get("tiles"),
                               bool(req.get("video")), req.get("overscan"))
    except (ValueError, TypeError) as exc:
        raise JobError(str(exc)) from None
    extra: dict[str, Any] = {}
    if project is not None:
        manifest_sha = projects.store(session, blobs, project)
        missing = projects.missing_warning(req.get("missing"))
        projects.attach(plans, project, manifest_sha, bool(missing) or bool(req.get("allow_missing")))
        extra["project"] = {"manifest_sha256": manifest_sha, "scene": project.scene,
                            "files": len(project.files), "bytes": project_bytes}
        if missing:
            extra["missing"] = missing
    spec = {"scene_sha256": scene, "frames": req.get("frames"), "chunk": chunk, "settings": settings,
            "client_key": client_key, "scene_name": str(req.get("scene_name", ""))[:200],
            "tiles": req.get("tiles") or None, "video": bool(req.get("video")), "overscan": req.get("overscan"),
            "min_tier": min_tier(req), **extra}
    return store_plans(session, owner, "blender", str(req.get("name") or "")[:200], int(req.get("priority", 0)),
                       spec, plans, f"frames {req.get('frames')}")


PRICED_TIERS = {"any": "", "trusted": "trusted", "top": "top"}
"""A priced tier (``tier``, farm.payments.quotes) → the minimum worker tier it stands for."""


def min_tier(req: dict[str, Any]) -> str:
    """The minimum worker tier of a request: its priced ``tier`` when it names one, else ``min_tier``."""
    if req.get("tier"):
        if req["tier"] not in PRICED_TIERS:
            raise JobError(f"tier must be any, trusted or top, got {req['tier']!r:.40}", 422)
        return PRICED_TIERS[req["tier"]]
    tier = req.get("min_tier") or ""
    if tier not in ("", "new", "trusted", "top"):
        raise JobError(f"min_tier must be new, trusted or top, got {tier!r}")
    return tier


def job_for_key(session: Session, owner: User, client_key: str) -> Job | None:
    """The owner's job created with this idempotency key, if any (a retried submit returns it)."""
    if not client_key:
        return None
    return session.exec(select(Job).where(Job.owner_id == owner.id)
                        .where(Job.spec["client_key"].as_string() == client_key)).first()


def store_plans(session: Session, owner: User, kind: str, name: str, priority: int, spec: dict[str, Any],
                plans: list[splitter.TaskPlan], what: str) -> Job:
    """Create the job and its tasks from a plan (tasks that wait for others start as ``waiting``). Refuses,
    before writing, a job over MAX_TASKS_PER_JOB tasks or a creator over MAX_ACTIVE_TASKS_PER_CREATOR."""
    if len(plans) > C.MAX_TASKS_PER_JOB:
        raise JobError(f"this job would have {len(plans)} tasks, more than the farm's {C.MAX_TASKS_PER_JOB}: render "
                       "several frames per task (--chunk), use fewer tiles, or split it into several jobs", 413)
    active = session.exec(select(func.count()).select_from(Task).join(Job, Job.id == Task.job_id)
                          .where(Job.owner_id == owner.id).where(Task.check_id.is_(None))
                          .where(Task.status.in_([TaskStatus.waiting.value, TaskStatus.queued.value]))).one()
    if active + len(plans) > C.MAX_ACTIVE_TASKS_PER_CREATOR:
        raise JobError(f"you have {active} tasks waiting in the queue; {len(plans)} more would pass the "
                       f"{C.MAX_ACTIVE_TASKS_PER_CREATOR} a creator may have: wait for your jobs to render, or "
                       "cancel some", 429)
    spec = {**spec, "outputs_total": sum(len(p.outputs) for p in plans if p.final)}
    job = Job(owner_id=owner.id, name=name, kind=kind, priority=priority, spec=spec, tasks_total=len(plans))
    session.add(job)
    session.flush()
    # one multi-row INSERT per few hundred tasks (Core, not the ORM's unit of work): a 20,000-task job is
    # written in well under a second, so the database's write lock is not held for seconds
    now = time.time()
    rows = [{"job_id": job.id, "index": i, "kind": p.kind, "priority": priority,
             "spec": {**p.spec, "outputs": p.outputs, "final": p.final, "units": p.units},
             "inputs": list(p.inputs), "progress_total": p.units, "attempt": 0, "failed_workers": [],
             "status": TaskStatus.waiting.value if p.needs or p.held else TaskStatus.queued.value,
             "error": "", "progress_done": 0, "render_seconds": 0.0, "work_units": 0.0,
             "created_at": now, "updated_at": now} for i, p in enumerate(plans)]
    session.execute(insert(Task), rows)
    QUEUE_EPOCH.move(session)
    if any(p.needs for p in plans):
        ids = dict(session.exec(select(Task.index, Task.id).where(Task.job_id == job.id)).all())
        deps = [{"task_id": ids[i], "needs_id": ids[n]} for i, p in enumerate(plans) for n in p.needs]
        session.execute(insert(TaskDep), deps)
    session.add(Event(kind="job", job_id=job.id, new=JobStatus.queued.value, detail=f"{len(plans)} tasks, {what}"))
    return job


def get_job(session: Session, job_id: int, user: User) -> Job:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id < 2**63:
        raise JobError(f"job {job_id!r:.40} not found: job ids are positive whole numbers", 404)  # no SQL overflow
    job = session.get(Job, job_id)
    if job is None or (job.owner_id != user.id and not user.is_admin):
        raise JobError(f"job {job_id} not found", 404)
    return job


def task_counts(session: Session, job_id: int) -> dict[str, int]:
    rows = session.exec(select(Task.status, func.count()).where(Task.job_id == job_id)
                        .where(Task.check_id.is_(None)).where(Task.probe.is_(False)).group_by(Task.status))
    return {status: n for status, n in rows}


def job_view(session: Session, job: Job, detail: bool = False) -> dict[str, Any]:
    counts = task_counts(session, job.id)
    frames_total = job.spec.get("outputs_total", 0)
    frames_done = session.exec(select(func.count()).select_from(Output).where(Output.job_id == job.id)
                               .where(Output.final)).one()
    # progress in task units (frames, tiles, images): finished tasks count whole, leased ones by progress
    units_total, units_done = session.exec(
        select(func.coalesce(func.sum(Task.progress_total), 0),
               func.coalesce(func.sum(case((Task.status == TaskStatus.accepted.value, Task.progress_total),
                                           (Task.status.in_([s.value for s in TASK_LEASED]), Task.progress_done),
                                           else_=0)), 0))
        .where(Task.job_id == job.id).where(Task.check_id.is_(None)).where(Task.probe.is_(False))).one()
    view = {"id": job.id, "name": job.name, "kind": job.kind, "status": job.status, "priority": job.priority,
            "created_at": job.created_at, "updated_at": job.updated_at, "error": job.error,
            "tasks": {"total": job.tasks_total, **counts}, "frames_total": frames_total,
            "frames_done": frames_done,
            "units_total": units_total, "units_done": units_done,
            "progress": min(1.0, units_done / units_total) if units_total else 0.0,
            "spec": {k: v for k, v in job.spec.items() if k != "client_key"}}
    if "probe" in job.spec:  # what the probe render measured (farm.kinds.probe); never its output
        view["probe"] = {k: v for k, v in job.spec["probe"].items() if k not in ("task_id", "then", "attempt")}
        view["probe"]["state"] = ("probing" if job.status == JobStatus.probing.value else
                                  "measured" if "seconds" in job.spec["probe"] else "ended")
    if detail:
        tasks = session.exec(select(Task).where(Task.job_id == job.id).where(Task.check_id.is_(None))
                             .where(Task.probe.is_(False)).order_by(Task.index)).all()
        view["task_list"] = [{"id": t.id, "index": t.index, "status": t.status, "attempt": t.attempt,
                              "worker_id": t.worker_id, "frames": t.spec.get("frames"), "error": t.error,
                              "progress": [t.progress_done, t.progress_total]} for t in tasks]
        view["checks"] = [check_view(c) for c in session.exec(
            select(Check).where(Check.job_id == job.id).where(Check.mode != "probe").order_by(Check.id))]
        events = session.exec(select(Event).where(Event.job_id == job.id).order_by(Event.id.desc()).limit(200)).all()
        view["events"] = [{"at": e.at, "kind": e.kind, "task_id": e.task_id, "attempt": e.attempt,
                           "worker_id": e.worker_id, "old": e.old, "new": e.new, "detail": e.detail}
                          for e in reversed(events)]
    return view


def check_view(c: Check) -> dict[str, Any]:
    return {"id": c.id, "task_id": c.task_id, "attempt": c.attempt, "worker_id": c.suspect_id,
            "verifier_id": c.verifier_id, "mode": c.mode, "reason": c.reason, "output": c.output_name,
            "status": c.status, "regions": c.regions, "created_at": c.created_at, "decided_at": c.decided_at,
            **{k: c.metric[k] for k in ("ssim", "max_diff", "why", "exact") if k in c.metric}}


def outputs(session: Session, job: Job) -> list[Output]:
    """The job's results (final outputs), in frame order."""
    return list(session.exec(select(Output).where(Output.job_id == job.id).where(Output.final)
                             .order_by(Output.frame, Output.name)))


def released_outputs(session: Session, job: Job) -> list[Output] | None:
    """The outputs the creator may have in full (their files and hashes), or None while none is released:
    all of an approved or paid job's; of a canceled job whose accepted work has been paid on chain (its
    settlement is ``paid``), those of its accepted tasks, the frames it paid for."""
    if job.status in (JobStatus.approved.value, JobStatus.paid.value):
        return outputs(session, job)
    if job.status != JobStatus.canceled.value:
        return None
    from farm.store.ledger_models import Settlement, SettlementStatus
    st = session.get(Settlement, job.id)
    if st is None or st.status != SettlementStatus.paid.value:
        return None
    return list(session.exec(select(Output).join(Task, (Task.id == Output.task_id) & (Task.attempt == Output.attempt))
                             .where(Output.job_id == job.id).where(Output.final)
                             .where(Task.status == TaskStatus.accepted.value).order_by(Output.frame, Output.name)))


def cancel_job(session: Session, job: Job, reason: str = "canceled by the creator") -> list[tuple[str, int, int]]:
    """Cancel the job and its unfinished tasks. Returns (worker_id, task_id, attempt) of the leases the
    broker must revoke. Canceling a finished job is a no-op (idempotent)."""
    if job.status in (JobStatus.canceled.value, JobStatus.failed.value, JobStatus.paid.value,
                      JobStatus.approved.value):
        return []
    now = time.time()
    revoke = []
    # the leased tasks now (a few: one per busy slot), each with its attempt ended and a CANCEL to send;
    # the rest in bounded batches (CANCEL_BATCH), now and by the coordinator's sweeps (Coordinator.cancel_job
    # notes the job; a coordinator finds leftovers at start): a 20,000-task job's cancel must not
    # hold the coordinator's thread for seconds (it is canceled, so none of them is leased meanwhile)
    leased = [s.value for s in TASK_LEASED]
    for task in session.exec(select(Task).where(Task.job_id == job.id).where(Task.status.in_(leased))):
        if task.worker_id:
            revoke.append((task.worker_id, task.id, task.attempt))
            att = session.exec(select(Attempt).where(Attempt.task_id == task.id)
                               .where(Attempt.attempt == task.attempt)).first()
            if att:
                att.outcome, att.ended_at = "canceled", now
                session.add(att)
        transition(session, task, TaskStatus.canceled, reason=reason, worker_id=task.worker_id,
                   attempt=task.attempt, now=now)
        task.worker_id, task.lease_expires = None, None
    transition(session, job, JobStatus.canceled, reason=reason, now=now)
    session.flush()
    cancel_rest(session, job.id, reason, now)
    return revoke


UNFINISHED = (TaskStatus.waiting.value, TaskStatus.queued.value, TaskStatus.done.value, TaskStatus.verifying.value)
"""Task states a canceled job's tasks leave in bulk (leased ones are ended one by one, with their attempts)."""


def cancel_rest(session: Session, job_id: int, reason: str, now: float) -> int:
    """Cancel up to CANCEL_BATCH of a canceled job's unfinished (not leased) tasks; the number moved (fewer
    than CANCEL_BATCH: none is left)."""
    ids = list(session.exec(select(Task.id).where(Task.job_id == job_id).where(Task.status.in_(UNFINISHED))
                            .order_by(Task.id).limit(C.CANCEL_BATCH)).all())
    return transition_tasks(session, ids, UNFINISHED, TaskStatus.canceled, reason=reason, now=now)


def leftover_cancels(session: Session) -> list[int]:
    """Jobs canceled (or failed) whose unfinished tasks are not all canceled yet — left by a coordinator
    that stopped between batches. One scan of the unfinished tasks: for start-up, not for every sweep."""
    ended = (JobStatus.canceled.value, JobStatus.failed.value)
    return list(session.exec(select(Task.job_id).join(Job, Job.id == Task.job_id).where(Job.status.in_(ended))
                             .where(Task.status.in_(UNFINISHED)).distinct()).all())
