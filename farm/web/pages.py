"""The creator's approval web pages: sign in, jobs, one job (live progress, watermarked gallery, reject,
approve, cost breakdown, download after approval), workers. Server-rendered (Jinja2) with a little plain
JavaScript (static/app.js) for the live parts (server-sent events) and the lightbox.

Invariants:

* a page or file of a job is served only to its creator (anyone else gets 404, as in the API);
* before the job is approved only watermarked, downscaled previews are served; the full-resolution zip
  exists only for approved or paid jobs;
* every POST carries the session's CSRF token (sign-in: a double-submit cookie); without it: 403;
* approve and reject run through :mod:`farm.web.review` on the coordinator's thread, so a double click
  approves (and pays) once.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import select

from common.rasters import RasterError
from farm.kinds import jobs
from farm.kinds.jobs import JobError
from farm.payments import own_wallets
from farm.payments.ledger import LedgerError
from farm.store import changes
from farm.store.blobs import BlobStore
from farm.store.db import session as new_session
from farm.store.models import Job, User, WebSession, Worker
from farm.store.states import JOB_TERMINAL, JobStatus
from farm.web import auth
from farm.web.conditions import condition_blobs, image_conditions
from farm.web.previews import PreviewCache
from farm.web.wallet_pages import add_wallet_routes, own_wallet_job

HERE = Path(__file__).parent
SESSION_COOKIE, PRELOGIN_COOKIE = "rh_session", "rh_prelogin"
SESSION_SECONDS = 7 * 24 * 3600
RELEASED = {JobStatus.approved.value, JobStatus.paid.value}
REVIEWABLE = {JobStatus.rendered.value}

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
templates.filters["ago"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Unauthorized(Exception):
    """No valid session: the page redirects to sign-in."""


def web_router(engine, blobs: BlobStore, previews: PreviewCache, serial: Callable, ledger=None,
               review=None, payments=None, market=None) -> APIRouter:
    """Pages under ``/``. ``review`` provides approve_job/reject_job, ``payments`` payment/payouts views,
    ``market`` the price now (farm.payments.market; None: the fixed price)."""
    router = APIRouter(include_in_schema=False)

    def render(name: str, request: Request, user: User | None = None, **ctx) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(request=request, user=user, **ctx))

    # ------------------------------------------------------------------ sessions and CSRF
    def current(request: Request) -> tuple[User, WebSession]:
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid:
            raise Unauthorized()
        with new_session(engine) as s:
            ws = s.get(WebSession, _hash(sid))
            if ws is None or ws.expires_at < time.time():
                raise Unauthorized()
            return s.get(User, ws.user_id), ws

    async def form_checked(request: Request, ws: WebSession) -> dict[str, Any]:
        form = dict(await request.form())
        if not secrets.compare_digest(str(form.get("csrf", "")), ws.csrf):
            raise HTTPException(403, "this form has expired or did not come from this site: reload the page and try again")
        return form

    def own_job(job_id: int, user: User, money: bool = True) -> dict[str, Any]:
        """The creator's job view; ``money``: with its payment and payouts (the live stream needs neither)."""
        with new_session(engine) as s:
            job = jobs.get_job(s, job_id, user)
            if job.owner_id != user.id:  # the admin sees the API, not other creators' previews
                raise JobError(f"job {job_id} not found", 404)
            view = jobs.job_view(s, job, detail=True)
            view["outputs"] = [o.model_dump() for o in jobs.outputs(s, job)]
            if payments is not None and money:
                view["payment"] = payments.payment_view(s, ledger, job)
                view["payouts"] = payments.payouts_view(s, ledger, job)
            return view

    def own_conditions(job_id: int, user: User) -> dict[str, dict[str, Any]]:
        """Output name → what made that image (farm.web.conditions), for the creator's own job."""
        with new_session(engine) as s:
            job = jobs.get_job(s, job_id, user)
            if job.owner_id != user.id:
                raise JobError(f"job {job_id} not found", 404)
            return image_conditions(s, job)

    async def _custodial_only(job_id: int, user: User, kind: str) -> None:
        """A form approves or rejects for a custodial wallet only; a job paid from the creator's own wallet is
        reviewed by that wallet's signature (the page's wallet buttons)."""
        if ledger is None:
            return
        try:
            await asyncio.to_thread(own_wallets.accept_signature, ledger, engine, job_id, user, kind, "")
        except LedgerError as exc:
            raise JobError(str(exc), exc.status) from None

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str = "") -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        resp = render("login.html", request, csrf=token, error=error)
        resp.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", max_age=3600)
        return resp

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = dict(await request.form())
        pre = request.cookies.get(PRELOGIN_COOKIE, "")
        if not pre or not secrets.compare_digest(str(form.get("csrf", "")), pre):
            raise HTTPException(403, "sign-in form expired: reload the page and sign in again")
        with new_session(engine) as s:
            user = auth.user_for_token(s, str(form.get("token", "")).strip())
            if user is None:
                return login_page(request, error="That token is not valid. Use the token `farm user` printed "
                                                 "for you (or DATA/admin.token).")
            sid = secrets.token_urlsafe(32)
            s.add(WebSession(id_hash=_hash(sid), user_id=user.id, csrf=secrets.token_urlsafe(24),
                             expires_at=time.time() + SESSION_SECONDS))
            s.commit()
        resp = RedirectResponse("/jobs", status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", max_age=SESSION_SECONDS)
        resp.delete_cookie(PRELOGIN_COOKIE)
        return resp

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        user, ws = current(request)
        await form_checked(request, ws)
        with new_session(engine) as s:
            row = s.get(WebSession, ws.id_hash)
            if row:
                s.delete(row)
                s.commit()
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # ------------------------------------------------------------------ pages
    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/jobs", status_code=303)

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, status: str = "") -> HTMLResponse:
        user, ws = current(request)
        with new_session(engine) as s:
            q = select(Job).where(Job.owner_id == user.id).order_by(Job.id.desc()).limit(200)
            if status:
                q = q.where(Job.status == status)
            rows = []
            for j in s.exec(q):
                view = jobs.job_view(s, j)
                if payments is not None:
                    view["payment"] = payments.payment_view(s, ledger, j)
                rows.append(view)
        return render("jobs.html", request, user, csrf=ws.csrf, jobs=rows, status=status,
                      statuses=[x.value for x in JobStatus], payments=ledger is not None, own_wallet=False)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: int) -> HTMLResponse:
        user, ws = current(request)
        view = own_job(job_id, user)
        try:
            own = own_wallet_job(engine, ledger, job_id, user)
        except Exception:  # the chain is down: the page still shows the job; the wallet part says so
            own = False
        return render("job.html", request, user, csrf=ws.csrf, job=view, released=view["status"] in RELEASED,
                      conditions=own_conditions(job_id, user),
                      reviewable=view["status"] in REVIEWABLE, job_json=json.dumps(_live(view)), own_wallet=own,
                      payments=ledger is not None)

    @router.get("/jobs/{job_id}/live")
    async def live(request: Request, job_id: int) -> StreamingResponse:
        """Server-sent events for the job page: a small JSON view whenever it changes."""
        user, _ = current(request)
        follow = changes.Follow(job_id)  # before the read: no change is missed
        first = await asyncio.to_thread(own_job, job_id, user, False)

        async def stream():
            loop = asyncio.get_running_loop()
            last, view, end = None, first, loop.time() + 3600  # bounded: the browser reconnects after an hour
            while loop.time() < end:
                data = json.dumps(_live(view), sort_keys=True)
                if data != last:
                    yield f"event: job\ndata: {data}\n\n"
                    last = data
                if view["status"] in {x.value for x in JOB_TERMINAL}:
                    return
                await follow.next()  # woken by the commit that changed it
                if await request.is_disconnected():
                    return
                view = await asyncio.to_thread(own_job, job_id, user, False)
        return StreamingResponse(stream(), media_type="text/event-stream")

    @router.get("/jobs/{job_id}/previews/{name}")
    def preview(request: Request, job_id: int, name: str) -> FileResponse:
        user, _ = current(request)
        view = own_job(job_id, user)
        for o in view["outputs"]:
            if o["name"] == name and not name.endswith(".mp4"):
                try:
                    path = previews.get(o["sha256"], blobs.path(o["sha256"]))
                except RasterError as exc:  # refused from its header, or damaged: say so, not 500
                    raise HTTPException(422, f"no preview of {name}: {exc}") from None
                return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
        raise HTTPException(404, "no such preview")

    @router.get("/jobs/{job_id}/conditions/{sha256}")
    def condition_thumb(request: Request, job_id: int, sha256: str) -> FileResponse:
        """A thumbnail of a condition image (control image, render pass, mask, init frame) of one of the
        creator's jobs: only the blobs that job took as inputs, watermarked and downscaled like a preview."""
        user, _ = current(request)
        if sha256 not in condition_blobs(own_conditions(job_id, user)) or not blobs.has(sha256):
            raise HTTPException(404, "no such condition image in this job")
        try:
            path = previews.get(sha256, blobs.path(sha256))
        except RasterError as exc:
            raise HTTPException(422, f"no thumbnail of {sha256[:12]}: {exc}") from None
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/jobs/{job_id}/download.zip")
    def download_zip(request: Request, job_id: int) -> Response:
        user, _ = current(request)
        view = own_job(job_id, user)
        if view["status"] not in RELEASED:
            raise HTTPException(403, "full-resolution files are released after you approve the job")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for o in view["outputs"]:
                z.write(blobs.path(o["sha256"]), Path(o["name"]).name)
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="job-{job_id}.zip"'})

    @router.post("/jobs/{job_id}/approve")
    async def approve(request: Request, job_id: int) -> Response:
        user, ws = current(request)
        await form_checked(request, ws)
        await _custodial_only(job_id, user, "approve")
        await serial(review.approve_job, engine, job_id, user)
        if ledger is not None and getattr(ledger, "wake_hook", None):
            ledger.wake_hook()
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    @router.post("/jobs/{job_id}/reject")
    async def reject(request: Request, job_id: int) -> Response:
        user, ws = current(request)
        form = await form_checked(request, ws)
        reason = str(form.get("reason", "")).strip()
        if not reason:
            raise JobError("say why the frame is rejected, so the re-render can fix it", 422)
        await _custodial_only(job_id, user, "reject")
        await serial(review.reject_job, engine, job_id, user, str(form.get("frames", "")), reason)
        if ledger is not None and getattr(ledger, "wake_hook", None):
            ledger.wake_hook()
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    @router.get("/workers", response_class=HTMLResponse)
    def workers_page(request: Request) -> HTMLResponse:
        user, ws = current(request)
        with new_session(engine) as s:
            rows = list(s.exec(select(Worker).order_by(Worker.online.desc(), Worker.id)))
        from farm.payments import earnings, pricing
        from farm.verify.reputation import speed
        price = pricing.tokens(earnings.current_price(getattr(ledger, "pricing", None) or pricing.Pricing.from_env(),
                                                      market))
        return render("workers.html", request, user, csrf=ws.csrf, workers=rows, speed=speed, price=price,
                      price_unit=earnings.UNIT, payments=ledger is not None,
                      load=round(market.load(), 2) if market else None)

    add_wallet_routes(router, engine, serial, ledger, current)
    return router


def _live(view: dict[str, Any]) -> dict[str, Any]:
    """The part of a job's view the page updates live."""
    running = [t for t in view.get("task_list", []) if t["status"] in ("assigned", "running")]
    return {"status": view["status"], "progress": view["progress"], "frames_done": view["frames_done"],
            "frames_total": view["frames_total"], "tasks": view["tasks"], "error": view["error"],
            "running": [{"index": t["index"], "worker": t["worker_id"], "frames": t["frames"],
                         "progress": t["progress"]} for t in running],
            "outputs": [o["name"] for o in view.get("outputs", [])]}
