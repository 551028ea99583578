"""The creator plane: HTTP JSON API (FastAPI). Thin routes over :mod:`farm.kinds.jobs` and the blob store.

Every route but ``/api/health`` needs ``Authorization: Bearer <token>``. Creators see only their own
jobs (another creator's job is a 404, never a 403 that would confirm it exists). Uploads are
content-addressed: ask ``POST /api/blobs/missing`` first, then ``PUT /api/blobs/{sha256}`` only those, so
re-submitting a scene uploads nothing. Operations that change tasks run on the coordinator's thread.
"""

import asyncio
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError
from sqlmodel import Session, select

from common.hashing import check_sha
from common.keys import is_key
from farm.kinds import jobs
from farm.kinds.registry import create_job
from farm.store.blobs import BlobError, BlobStore
from farm.store.db import session as new_session
from farm.store.models import Blob, Job, ReputationEvent, User, Worker
from farm.store.states import JOB_TERMINAL, JobStatus
from farm.verify import reputation
from farm.web import auth, metrics
from farm.web.payments import payments_router


class ErrorOut(BaseModel):
    """Every error answer. Routes explain in a sentence what went wrong and what to do; FastAPI's own
    request validation lists the bad fields. (Documented for 422, which carries both.)"""
    detail: str | list[dict[str, Any]]


class MissingRequest(BaseModel):
    hashes: list[str] = Field(max_length=10000)


class WorkerKeyRequest(BaseModel):
    worker: str = Field(min_length=1, max_length=100, description="a worker's public key (Z85, 40 characters) "
                        "or, to revoke, a worker id (its key is looked up)")


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class JobCreate(BaseModel):
    scene_sha256: str
    frames: str = Field(min_length=1, max_length=2000)
    chunk: int = Field(1, ge=1, le=10000)
    format: str = "PNG"
    color_depth: str | None = None
    samples: int | None = None
    resolution_percent: int | None = None
    resolution: list[int] | None = Field(None, min_length=2, max_length=2,
                                         description="output [width, height] in pixels (percentage then 100)")
    tiles: str | None = Field(None, max_length=10, description="COLSxROWS tiles per frame, 1x1 to 16x16, "
                              "each frame stitched exactly from its tiles")
    overscan: int | None = Field(None, ge=0, le=256, description="tile margin in pixels (default: from the "
                                 "scene: 16 with denoising, 4-16 with adaptive sampling, else 0)")
    video: bool = Field(False, description="also encode the frames to video.mp4 (H.264, the scene's fps)")
    priority: int = Field(0, ge=-100, le=100)
    min_tier: Literal["", "new", "trusted", "top"] = Field("", description="only workers of this reputation "
                                                           "tier or better render it (farm workers shows tiers)")
    name: str = Field("", max_length=200)
    scene_name: str = Field("", max_length=200)
    client_key: str = Field("", max_length=100, description="idempotency key: a retried submit returns the same job")


class DiffusionJobCreate(BaseModel):
    """A Stable Diffusion batch. Ranges are checked by farm.kinds.diffusion, whose errors say what to change."""
    model: str = Field(min_length=1, max_length=300, description="model name or hub id that workers advertise")
    model_hash: str = Field("", max_length=64, description="pin this version (sha256 of the model folder)")
    prompts: list[str] = Field(min_length=1, max_length=1000)
    negative: str = Field("", max_length=2000)
    count: int = Field(1, description="images per prompt (txt2img)")
    seed: int | None = Field(None, description="base seed: image k uses seed + k (default: random, recorded)")
    steps: int = 30
    guidance: float = 7.5
    width: int | None = Field(None, description="multiple of 8 (default 512; img2img: the source frames')")
    height: int | None = None
    scheduler: str = "default"
    per_task: int = Field(1, description="images per task (micro-batch)")
    init_from_job: int | None = Field(None, description="img2img: frame i of this job becomes image i")
    strength: float = 0.5
    priority: int = Field(0, ge=-100, le=100)
    min_tier: Literal["", "new", "trusted", "top"] = Field("", description="only workers of this reputation "
                                                           "tier or better render it (farm workers shows tiers)")
    name: str = Field("", max_length=200)
    client_key: str = Field("", max_length=100, description="idempotency key: a retried submit returns the same job")


def create_app(engine, blobs: BlobStore, broker=None, info: dict[str, Any] | None = None, ledger=None) -> FastAPI:
    app = FastAPI(title="Renderhive", version="0.1.0",
                  description="Submit Blender jobs, upload scenes, follow progress, download results.",
                  responses={422: {"model": ErrorOut, "description": "Invalid request: what to change"}})

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        """A value the database refuses (PostgreSQL: a NUL character in text, an integer beyond 64 bits)."""
        why = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        return JSONResponse({"detail": f"a value in this request cannot be stored ({why}): remove NUL characters "
                                       "and keep whole numbers within 64 bits"}, status_code=422)

    def get_session():
        with new_session(engine) as s:
            yield s

    SessionDep = Annotated[Session, Depends(get_session)]

    def get_user(s: SessionDep, authorization: Annotated[str | None, Header()] = None) -> User:
        token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
        user = auth.user_for_token(s, token)
        if user is None:
            raise HTTPException(401, "missing or unknown API token: pass 'Authorization: Bearer <token>' "
                                     "(farm --token, or RENDERHIVE_TOKEN)")
        return user

    UserDep = Annotated[User, Depends(get_user)]

    async def serial(fn, *args):
        """Run on the coordinator thread when a broker is attached (tests may run without one)."""
        if broker is not None:
            return await broker.call(fn, *args)
        return await asyncio.to_thread(fn, *args)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, **(info or {})}

    @app.get("/api/me")
    def me(user: UserDep) -> dict[str, Any]:
        return {"id": user.id, "name": user.name, "is_admin": user.is_admin}

    @app.post("/api/users", status_code=201)
    def create_user(body: UserCreate, user: UserDep, s: SessionDep) -> dict[str, Any]:
        if not user.is_admin:
            raise HTTPException(403, "only the admin creates users (use the token in DATA/admin.token)")
        if s.exec(select(User).where(User.name == body.name)).first():
            raise HTTPException(409, f"user {body.name!r} exists already: pick another name")
        new, token = auth.create_user(s, body.name)
        s.commit()
        return {"id": new.id, "name": new.name, "token": token}

    # ------------------------------------------------------------------ blobs
    @app.post("/api/blobs/missing")
    def missing(body: MissingRequest, user: UserDep) -> dict[str, list[str]]:
        try:
            return {"missing": blobs.missing(check_sha(h) for h in body.hashes)}
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.put("/api/blobs/{sha256}", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_blob(sha256: str, request: Request, user: UserDep) -> dict[str, Any]:
        """Store the request body as blob ``sha256`` (the sha256 of the bytes, lowercase hex)."""
        try:
            check_sha(sha256)
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None
        too_big = f"exceeds the {blobs.max_bytes} byte limit: reduce the scene (pack fewer or smaller textures)"
        length = request.headers.get("content-length")
        try:
            declared = int(length) if length is not None else 0
        except ValueError:
            raise HTTPException(400, f"Content-Length {length[:40]!r} is not a number of bytes") from None
        if declared > blobs.max_bytes:
            raise HTTPException(413, f"upload of {length} bytes {too_big}")
        if blobs.has(sha256):
            return {"sha256": sha256, "size": blobs.size(sha256), "stored": False}
        fd, name = tempfile.mkstemp(dir=blobs.root / "tmp", suffix=".upload")
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > blobs.max_bytes:
                        raise HTTPException(413, f"upload {too_big}")
                    f.write(chunk)
            with open(name, "rb") as f:
                size = await asyncio.to_thread(blobs.write_stream, sha256, iter(lambda: f.read(1 << 20), b""))
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None
        finally:
            Path(name).unlink(missing_ok=True)
        with new_session(engine) as s:
            if not s.get(Blob, sha256):
                s.add(Blob(sha256=sha256, size=size, origin="upload"))
                s.commit()
        return {"sha256": sha256, "size": size, "stored": True}

    # ------------------------------------------------------------------ jobs
    @app.post("/api/jobs", status_code=201)
    async def submit(body: JobCreate, user: UserDep) -> dict[str, Any]:
        def create():
            with new_session(engine) as s:
                job = create_job("blender", s, user, blobs, body.model_dump())
                s.commit()
                return jobs.job_view(s, job)
        view = await asyncio.to_thread(create)
        if broker is not None:
            broker.wake()
        return view

    @app.post("/api/jobs/diffusion", status_code=201)
    async def submit_diffusion(body: DiffusionJobCreate, user: UserDep) -> dict[str, Any]:
        """Images from prompts (or img2img over another job's frames) plus a contact sheet. Created on the
        coordinator's thread, so a source job cannot become rendered between the check and the commit."""
        def create():
            with new_session(engine) as s:
                job = create_job("diffusion", s, user, blobs, body.model_dump())
                s.commit()
                return jobs.job_view(s, job)
        return await serial(create)

    @app.get("/api/jobs")
    def list_jobs(user: UserDep, s: SessionDep, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, 500)))
        if not user.is_admin:
            q = q.where(Job.owner_id == user.id)
        if status:
            q = q.where(Job.status == status)
        return [jobs.job_view(s, j) for j in s.exec(q)]

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: int, user: UserDep, s: SessionDep) -> dict[str, Any]:
        return jobs.job_view(s, jobs.get_job(s, job_id, user), detail=True)

    @app.post("/api/jobs/{job_id}/cancel")
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

    @app.get("/api/jobs/{job_id}/outputs")
    def list_outputs(job_id: int, user: UserDep, s: SessionDep) -> list[dict[str, Any]]:
        job = jobs.get_job(s, job_id, user)
        return [{"name": o.name, "frame": o.frame, "sha256": o.sha256, "size": o.size,
                 "worker_id": o.worker_id, "render_seconds": o.render_seconds} for o in jobs.outputs(s, job)]

    @app.get("/api/jobs/{job_id}/outputs/{name}")
    def get_output(job_id: int, name: str, user: UserDep, s: SessionDep):
        job = jobs.get_job(s, job_id, user)
        if job.status not in (JobStatus.approved.value, JobStatus.paid.value):
            raise HTTPException(403, f"full-resolution outputs of job {job_id} are released after you approve it: "
                                     f"review the watermarked previews on the job page (/jobs/{job_id}), then "
                                     f"approve (`farm approve {job_id}` or POST /api/jobs/{job_id}/approve)")
        for o in jobs.outputs(s, job):
            if o.name == name:
                media = {".exr": "image/x-exr", ".mp4": "video/mp4"}.get(Path(name).suffix, "image/png")
                return FileResponse(blobs.path(o.sha256), media_type=media, filename=name)
        raise HTTPException(404, f"job {job_id} has no output {name!r} (yet): see GET /api/jobs/{job_id}/outputs")

    @app.get("/api/jobs/{job_id}/events")
    async def follow(job_id: int, user: UserDep) -> StreamingResponse:
        """Server-sent events: the job's view whenever it changes, until it reaches a final state."""
        def snapshot():
            with new_session(engine) as s:
                return jobs.job_view(s, jobs.get_job(s, job_id, user))
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
                await asyncio.sleep(0.5)
                view = await asyncio.to_thread(snapshot)
        return StreamingResponse(stream(), media_type="text/event-stream")

    # ------------------------------------------------------------------ workers
    @app.get("/api/workers")
    def list_workers(user: UserDep, s: SessionDep) -> list[dict[str, Any]]:
        keys = dict(broker.keyring.bindings) if broker is not None and broker.keyring is not None else {}
        return [{"id": w.id, "online": w.online, "hostname": w.hostname, "slots": w.slots,
                 "wallet": w.wallet, "devices": w.capabilities.get("devices", []),
                 "tasks_done": w.tasks_done, "tasks_failed": w.tasks_failed,
                 "render_seconds": round(w.render_seconds, 3), "last_seen": w.last_seen,
                 "benchmark": w.benchmark, "public_key": keys.get(w.id, ""), **reputation.view(w)}
                for w in s.exec(select(Worker).order_by(Worker.id))]

    def admin_keyring(user: User):
        if not user.is_admin:
            raise HTTPException(403, "only the admin manages worker keys (use the token in DATA/admin.token)")
        if broker is None or broker.keyring is None:
            raise HTTPException(409, "this coordinator has no CurveZMQ keyring (an in-process test farm)")
        return broker.keyring

    @app.post("/api/workers/allow")
    async def allow_worker(body: WorkerKeyRequest, user: UserDep) -> dict[str, Any]:  # async: the keyring's thread
        """Put a worker's public key on the allow-list (and off the revocations): in allowlist and token
        mode such a key is admitted (`farm worker --print-key` shows a worker's key)."""
        keyring = admin_keyring(user)
        if not is_key(body.worker):
            raise HTTPException(422, f"{body.worker[:60]!r} is not a Z85 public key (40 characters): "
                                     "`farm worker --print-key --cache DIR` prints a worker's key")
        added = keyring.allow(body.worker, "allowed by the admin")
        return {"key": body.worker, "added": added, "mode": keyring.mode}

    @app.post("/api/workers/revoke")
    async def revoke_worker(body: WorkerKeyRequest, user: UserDep) -> dict[str, Any]:
        """Revoke a worker's key (or the key a worker id belongs to): refused from now on in every mode;
        its connections are dropped and their leases requeued at once."""
        keyring = admin_keyring(user)
        key = keyring.bindings.get(body.worker) or (body.worker if is_key(body.worker) else None)
        if key is None:
            raise HTTPException(404, f"no worker id or key {body.worker[:60]!r}: `farm workers` lists ids and keys")
        done = await broker.revoke(key, "this worker's key was revoked by the farm's operator")
        return {"key": key, **done}

    @app.get("/api/workers/{worker_id}/reputation")
    def worker_reputation(worker_id: str, user: UserDep, s: SessionDep,
                          limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """A worker's standing and the evidence behind it, newest first."""
        w = s.get(Worker, worker_id)
        if w is None:
            raise HTTPException(404, f"no worker {worker_id!r}: `farm workers` lists them")
        events = s.exec(select(ReputationEvent).where(ReputationEvent.worker_id == worker_id)
                        .order_by(ReputationEvent.id.desc()).limit(limit)).all()
        return {"id": w.id, **reputation.view(w),
                "history": [{"at": e.at, "kind": e.kind, "good": e.good, "bad": e.bad, "score": e.score,
                             "tier": e.tier, "job_id": e.job_id, "task_id": e.task_id, "detail": e.detail}
                            for e in events]}

    @app.get("/metrics", include_in_schema=False)
    def metrics_page(s: SessionDep, authorization: Annotated[str, Header()] = "") -> Response:
        """Prometheus metrics. Open unless RENDERHIVE_METRICS_TOKEN is set (then: Authorization: Bearer)."""
        want = os.environ.get("RENDERHIVE_METRICS_TOKEN", "")
        if want and not hmac.compare_digest(authorization.encode(), f"Bearer {want}".encode()):
            raise HTTPException(401, "metrics need 'Authorization: Bearer <RENDERHIVE_METRICS_TOKEN>'")
        return Response(metrics.render(s, broker.coord.stats if broker is not None else None),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # payments and review: estimate, deposit status, approve, reject, payouts, wallets
    app.include_router(payments_router(engine, get_user, serial, ledger))
    _mount_web(app, engine, blobs, serial, ledger)
    return app


def _mount_web(app: FastAPI, engine, blobs: BlobStore, serial, ledger) -> None:
    """The approval pages (farm.web.pages) and their static files; page errors are HTML, API errors JSON."""
    from fastapi.responses import HTMLResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from farm.web import pages as web
    from farm.web import payments as payments_api
    from farm.web import review
    from farm.web.previews import PreviewCache

    previews = PreviewCache(blobs.root.parent / "previews")
    app.mount("/static", StaticFiles(directory=web.HERE / "static"), name="static")
    app.include_router(web.web_router(engine, blobs, previews, serial, ledger, review, payments_api))

    @app.exception_handler(web.Unauthorized)
    async def _signin(request, _exc):
        return RedirectResponse("/login", status_code=303)

    def _page_error(request, status: int, message: str):
        if request.url.path.startswith("/api") or request.url.path.startswith("/docs"):
            return JSONResponse({"detail": message}, status_code=status)
        html = web.templates.get_template("error.html").render(request=request, user=None, status=status,
                                                               message=message)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _page_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(jobs.JobError)
    async def _job_error(request, exc: jobs.JobError):
        return _page_error(request, exc.status, str(exc))
