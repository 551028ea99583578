"""Jobs: submit (any kind, through :mod:`farm.kinds.registry`, quoted and its price locked by
:mod:`farm.payments.quotes`; a Blender job of a scene the farm has no history of is probed first,
:mod:`farm.kinds.probe`), list, follow (server-sent events), cancel (on the coordinator's thread), and
the outputs, released in full only after approval.

Creators see only their own jobs: another creator's job is a 404, never a 403 that would confirm it exists.
"""
import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, StreamingResponse
from sqlmodel import select

from farm.kinds import jobs
from farm.kinds import probe as probes
from farm.kinds.registry import create_job
from farm.payments import quotes
from farm.store import changes
from farm.store.db import session as new_session
from farm.store.models import Job
from farm.store.states import JOB_TERMINAL, JobStatus
from farm.web.deps import Api
from farm.web.queue import queue_view
from farm.web.schemas import DiffusionJobCreate, JobCreate


def job_router(api: Api) -> APIRouter:
    r = APIRouter()
    engine, blobs, broker = api.engine, api.blobs, api.broker
    SessionDep, UserDep = api.SessionDep, api.UserDep
    serial = api.serial
    # probes are finished on the coordinator's thread: only a farm with one attached (farm serve) starts them
    probes_on = (broker is not None and getattr(broker.coord, "quoting", None) is not None
                 and probes.farm_probes(api.ledger is not None))

    def create_quoted(kind: str, req: dict[str, Any], user) -> dict[str, Any]:
        """Create the job with its quote locked (farm.payments.quotes), in one transaction: a max_price above
        the rate now refuses it before anything is written; a retried submit gets its job and its quote."""
        with new_session(engine) as s:
            existing = jobs.job_for_key(s, user, str(req.get("client_key") or "")[:100])
            if existing is not None:
                return jobs.job_view(s, existing)
            try:
                offer = quotes.offer(api.market, api.tiers, req)
            except quotes.QuoteRefused as exc:
                raise HTTPException(exc.status, str(exc)) from None
            job = create_job(kind, s, user, blobs, req, api.hold_for_deposit(user))
            # no history for its scene: one probe frame first, its quote re-made from it (farm.kinds.probe)
            probing = probes_on and probes.wanted(s, job) and probes.start(s, job) is not None
            s.flush()
            quotes.lock(s, api.pricing, job, offer, queue_view(s, job), probing=probing)
            s.commit()
            return jobs.job_view(s, job)

    @r.post("/api/jobs", status_code=201)
    async def submit(body: JobCreate, user: UserDep) -> dict[str, Any]:
        view = await asyncio.to_thread(create_quoted, "blender", body.model_dump(), user)
        if broker is not None:
            broker.wake()
        api.wake_ledger()  # a funding job waits for its deposit: take it now, not at the next pass
        return view

    @r.post("/api/jobs/diffusion", status_code=201)
    async def submit_diffusion(body: DiffusionJobCreate, user: UserDep) -> dict[str, Any]:
        """Images from prompts (or img2img over another job's frames) plus a contact sheet. Created on the
        coordinator's thread, so a source job cannot become rendered between the check and the commit."""
        view = await serial(create_quoted, "diffusion", body.model_dump(), user)
        api.wake_ledger()
        return view

    @r.get("/api/jobs")
    def list_jobs(user: UserDep, s: SessionDep, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, 500)))
        if not user.is_admin:
            q = q.where(Job.owner_id == user.id)
        if status:
            q = q.where(Job.status == status)
        return [jobs.job_view(s, j) for j in s.exec(q)]

    @r.get("/api/jobs/{job_id}")
    def get_job(job_id: int, user: UserDep, s: SessionDep) -> dict[str, Any]:
        job = jobs.get_job(s, job_id, user)
        return {**jobs.job_view(s, job, detail=True), "queue": queue_view(s, job)}

    @r.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: int, user: UserDep) -> dict[str, Any]:
        if broker is not None:
            return await broker.call(broker.coord.cancel_job, job_id, user)

        def direct():
            with new_session(engine) as s:
                job = jobs.get_job(s, job_id, user)
                jobs.cancel_job(s, job)
                s.commit()
                return jobs.job_view(s, job)
        return await asyncio.to_thread(direct)

    @r.get("/api/jobs/{job_id}/outputs")
    def list_outputs(job_id: int, user: UserDep, s: SessionDep) -> list[dict[str, Any]]:
        """The job's results. Their content hashes are given only once they are released (approved): before
        that a hash would name a full-resolution frame to anyone who can ask a worker plane for blobs."""
        job = jobs.get_job(s, job_id, user)
        released = {o.id for o in jobs.released_outputs(s, job) or []}
        return [{"name": o.name, "frame": o.frame, "size": o.size, "worker_id": o.worker_id,
                 "render_seconds": o.render_seconds, **({"sha256": o.sha256} if o.id in released else {})}
                for o in jobs.outputs(s, job)]

    @r.get("/api/jobs/{job_id}/outputs/{name}")
    def get_output(job_id: int, name: str, user: UserDep, s: SessionDep):
        job = jobs.get_job(s, job_id, user)
        released = jobs.released_outputs(s, job)
        if released is None:
            raise HTTPException(403, f"full-resolution outputs of job {job_id} are released after you approve it: "
                                     f"review the watermarked previews on the job page (/jobs/{job_id}), then "
                                     f"approve (`farm approve {job_id}` or POST /api/jobs/{job_id}/approve)"
                                + (" (a canceled job's paid frames are released once their payment is settled)"
                                   if job.status == JobStatus.canceled.value else ""))
        for o in released:
            if o.name == name:
                media = {".exr": "image/x-exr", ".mp4": "video/mp4"}.get(Path(name).suffix, "image/png")
                return FileResponse(blobs.path(o.sha256), media_type=media, filename=name)
        raise HTTPException(404, f"job {job_id} has no output {name!r} (yet): see GET /api/jobs/{job_id}/outputs")

    @r.get("/api/jobs/{job_id}/events")
    async def follow(job_id: int, user: UserDep) -> StreamingResponse:
        """Server-sent events: the job's view whenever it changes, until it reaches a final state."""
        def snapshot():
            with new_session(engine) as s:
                return jobs.job_view(s, jobs.get_job(s, job_id, user))
        changed = changes.Follow(job_id)  # before the read: no change is missed
        first = await asyncio.to_thread(snapshot)  # raises 404 before the stream starts

        async def stream():
            last, view = None, first
            while True:
                data = json.dumps(view, sort_keys=True)
                if data != last:
                    yield f"event: job\ndata: {data}\n\n"
                    last = data
                if view["status"] in {s.value for s in JOB_TERMINAL} | {JobStatus.rendered.value, JobStatus.approved.value}:
                    return
                await changed.next()  # woken by the commit that changed it
                view = await asyncio.to_thread(snapshot)
        return StreamingResponse(stream(), media_type="text/event-stream")

    return r
