"""Where a job stands in the queue, and when it will probably be done: the honest figures a creator asks
for before anything else (AI Horde tells every requester its queue position and wait time).

:func:`queue_view` is computed from the database, per job, when the API is asked (``GET /api/jobs/{id}``,
``farm status JOB``): nothing is stored and nothing runs on the coordinator's thread.

* **capable workers**: only the online workers that can run the job's tasks count — the runtime its kind
  needs, and for a diffusion job the model it names and the memory it books (``farm.kinds.vram``: a job
  only GPUs with that model and memory can run is not promised the whole farm); a trusted- or top-tier
  job counts only the workers of that tier or better (the scheduler leases it to no other:
  ``min_tier``), and no job counts a worker on probation;
* **work ahead**: the queued tasks that those workers take before this job's, in the claim order
  (priority, then job, then index), of jobs that may be leased (``farm.store.states.JOB_SCHEDULABLE``),
  plus the spot checks waiting (they go first: one priority up);
* **seconds a task**: measured, never guessed when it can be measured — the median of the coordinator's
  own lease-to-result times of this job's accepted tasks; else its probe render's measure of a unit
  (``farm.kinds.probe``) × the units a task holds; else of the farm's recent accepted tasks of the same
  kind; else the pricing default (RENDERHIVE_DEFAULT_SECONDS_PER_FRAME);
* **a slot's time a task**: those seconds plus the measured gap between a worker's tasks, times (1 + the
  spot checks the farm's recent job tasks brought): checks and dead time take the same slots;
* **ETA**: (tasks ahead + this job's tasks left) × a slot's time a task ÷ the capable workers' slots, and
  at least one slot's time a task (a job's tasks run in parallel, but each takes its time).
  A job waiting for its deposit (``funding``) or its probe (``probing``) is given the same figures: they
  start when it is funded.

The ETA is a planning figure; ``tests/e2e/test_queue_eta.py`` measures its error on a real farm.
"""
from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import Session, select

from farm.kinds import vram
from farm.payments import pricing as pr
from farm.store.models import Attempt, Job, Task, Worker
from farm.store.states import JOB_SCHEDULABLE, JobStatus, TaskStatus
from farm.verify import reputation as R

WAITING = (JobStatus.probing.value, JobStatus.funding.value, *(s.value for s in JOB_SCHEDULABLE))
LEFT = (TaskStatus.waiting.value, TaskStatus.queued.value, TaskStatus.assigned.value, TaskStatus.running.value)
RUNTIME = {"render": "blender", "diffusion": "diffusion", "assemble": "assemble", "encode": "encode"}
SAMPLE = 64  # accepted tasks the seconds-a-task median looks at


def _main_kind(s: Session, job: Job) -> str:
    return s.exec(select(Task.kind).where(Task.job_id == job.id).where(Task.check_id.is_(None))
                  .where(Task.probe.is_(False)).order_by(Task.index)).first() or "render"


def capable_workers(s: Session, job: Job, kind: str) -> list[Worker]:
    """The online workers whose runtimes (and models, and memory) can run ``job``'s tasks of ``kind``."""
    runtime, model = RUNTIME.get(kind, kind), job.spec.get("model_hash")
    need = job.spec.get("memory_need") if kind == "diffusion" else None
    tier = job.spec.get("min_tier") or ""
    out = []
    for w in s.exec(select(Worker).where(Worker.online)).all():
        if w.tier == R.Tier.probation or not R.at_least(w.tier, tier):  # as farm.core.assignment's filter
            continue
        caps = w.capabilities or {}
        if runtime not in caps.get("runtimes", ["blender"]):
            continue
        held = {m.get("hash") for m in caps.get("models") or [] if isinstance(m, dict) and not m.get("error")}
        if not {model, *(job.spec.get("pieces") or [])} - {None, ""} <= held:  # the model and its LoRAs
            continue
        if not vram.fits(need, vram.worker_memory(caps)):  # the scheduler never leases it one of these tasks
            continue
        out.append(w)
    return out


def seconds_per_task(s: Session, job: Job, kind: str) -> tuple[float, str]:
    """(seconds a task of ``job`` takes, how that was found): see the module docstring."""
    timed = (select(Attempt.ended_at - Attempt.started_at)
             .join(Task, (Task.id == Attempt.task_id) & (Task.attempt == Attempt.attempt))
             .where(Attempt.outcome == "done").where(Task.status == TaskStatus.accepted.value)
             .where(Task.check_id.is_(None)).where(Task.kind == kind).where(Attempt.ended_at.is_not(None)))
    mine = [x for x in s.exec(timed.where(Task.job_id == job.id).order_by(Task.id.desc()).limit(SAMPLE)).all()
            if x and x > 0]
    if mine:
        return statistics.median(mine), f"median of {len(mine)} of this job's tasks"
    probe = job.spec.get("probe") or {}
    if probe.get("seconds_per_unit") is not None:
        units = s.exec(select(func.coalesce(func.sum(Task.progress_total), 0), func.count())
                       .where(Task.job_id == job.id).where(Task.kind == kind).where(Task.check_id.is_(None))
                       .where(Task.probe.is_(False))).one()
        per_task = units[0] / units[1] if units[1] else 1
        return probe["seconds_per_unit"] * max(1.0, per_task), "this job's probe render"
    farm = [x for x in s.exec(timed.order_by(Attempt.id.desc()).limit(SAMPLE)).all() if x and x > 0]
    if farm:
        return statistics.median(farm), f"median of the farm's last {len(farm)} {kind} tasks"
    return pr.Pricing.from_env().default_seconds_per_frame, "default (no timed task yet)"


def overheads(s: Session) -> tuple[float, float]:
    """(seconds a worker spends between two tasks, spot checks per job task), both measured over the farm's
    recent attempts: the gap from a result to the worker's next lease (the READY round trip, fetching
    inputs), and how many check re-renders the job tasks brought (new workers are checked in full)."""
    rows = s.exec(select(Attempt.worker_id, Attempt.started_at, Attempt.ended_at, Task.check_id)
                  .join(Task, Task.id == Attempt.task_id).order_by(Attempt.id.desc()).limit(4 * SAMPLE)).all()
    by_worker: dict[str, list[tuple[float, float]]] = {}
    checks = jobs_ = 0
    for wid, started, ended, check in rows:
        checks, jobs_ = checks + (check is not None), jobs_ + (check is None)
        if started is not None and ended is not None:
            by_worker.setdefault(wid, []).append((started, ended))
    gaps = []
    for spans in by_worker.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:]) if 0 <= b[0] - a[1] < 30]
    return (statistics.median(gaps) if gaps else 0.0), (checks / jobs_ if jobs_ else 0.0)


def queue_view(s: Session, job: Job) -> dict[str, Any] | None:
    """Position, work ahead, capable workers and ETA of a job that is not done (None once it is)."""
    if job.status not in WAITING:
        return None
    kind = _main_kind(s, job)
    left = s.exec(select(func.count()).select_from(Task).where(Task.job_id == job.id).where(Task.probe.is_(False))
                  .where(Task.check_id.is_(None)).where(Task.status.in_(LEFT))).one()
    before = or_(Task.priority > job.priority, (Task.priority == job.priority) & (Task.job_id < job.id),
                 Task.check_id.is_not(None))
    ahead_q = (select(func.count(), func.count(func.distinct(Task.job_id))).select_from(Task)
               .join(Job, Job.id == Task.job_id)
               # leased but not started yet (a worker's prefetched next task) is work ahead like a queued one
               .where(Task.status.in_([TaskStatus.queued.value, TaskStatus.assigned.value]))
               .where(Task.job_id != job.id).where(Task.kind == kind)
               .where(or_(Job.status.in_([x.value for x in JOB_SCHEDULABLE]), Task.check_id.is_not(None)))
               .where(before))
    ahead, jobs_ahead = s.exec(ahead_q).one()
    running = s.exec(select(func.count()).select_from(Task).where(Task.job_id != job.id).where(Task.kind == kind)
                     .where(Task.status == TaskStatus.running.value)).one()
    workers = capable_workers(s, job, kind)
    slots = sum(max(1, w.slots) for w in workers)
    render, basis = seconds_per_task(s, job, kind)
    gap, check_share = overheads(s)
    per = (render + gap) * (1 + check_share)  # a slot's time a task takes, its share of checks included
    # the leases other jobs hold now finish first, on average half-way through
    busy = min(running, slots) * per / 2 / slots if slots else 0.0
    # a job is never done sooner than one task after it starts: on a farm with more slots than work, the
    # division alone promised a 25-task job in 3 s on 1,000 slots (bench/market.py: ETA error 90 %)
    eta = (busy + max(per, (ahead + left) * per / slots)) if slots else None
    return {"position": jobs_ahead + 1, "jobs_ahead": jobs_ahead, "tasks_ahead": ahead, "tasks_left": left,
            "workers_able": len(workers), "slots_able": slots, "seconds_per_task": round(per, 3), "basis": basis,
            "render_seconds": round(render, 3), "gap_seconds": round(gap, 3), "checks_per_task": round(check_share, 3),
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "note": "" if slots else "no online worker can run this job's tasks yet: it waits for one"}
