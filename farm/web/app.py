"""The creator plane's app (FastAPI): error handlers, health, metrics, and the routers mounted.

The routes are thin and live in one module per resource: :mod:`farm.web.api_blobs` (users, uploads),
:mod:`farm.web.api_uploads` (resumable uploads),
:mod:`farm.web.api_jobs`, :mod:`farm.web.api_workers`, :mod:`farm.web.payments` (estimate, approve,
reject, payouts) and the approval pages (:mod:`farm.web.pages`). What they share is :class:`farm.web.deps.Api`.
Every route but ``/api/health`` needs ``Authorization: Bearer <token>``; operations that change tasks
run on the coordinator's thread.
"""

import hmac
import os
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError

from farm.kinds import jobs
from farm.store.blobs import BlobStore
from farm.store.uploads import UploadArea
from farm.web import metrics, review
from farm.web.api_blobs import blob_router
from farm.web.api_jobs import job_router
from farm.web.api_uploads import upload_router
from farm.web.api_workers import worker_router
from farm.web.deps import Api
from farm.web.guard import Guard
from farm.web.payments import payments_router
from farm.web.schemas import ErrorOut
from farm.web.wallet_api import wallet_router


def create_app(engine, blobs: BlobStore, broker=None, info: dict[str, Any] | None = None, ledger=None,
               uploads: UploadArea | None = None, market=None) -> FastAPI:
    """``uploads``: the resumable uploads' area (default: under the blob store, limits from the environment);
    ``market``: the farm's :class:`farm.payments.market.Market` (default: one reading this database)."""
    app = FastAPI(title="Renderhive", version="0.1.0",
                  description="Submit Blender jobs, upload scenes, follow progress, download results.",
                  responses={422: {"model": ErrorOut, "description": "Invalid request: what to change"}})

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        """A value the database refuses (PostgreSQL: a NUL character in text, an integer beyond 64 bits)."""
        why = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        return JSONResponse({"detail": f"a value in this request cannot be stored ({why}): remove NUL characters "
                                       "and keep whole numbers within 64 bits"}, status_code=422)

    api = Api(engine, blobs, broker, info, ledger, market)
    SessionDep, UserDep = api.SessionDep, api.UserDep

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, **(info or {})}

    @app.get("/api/me")
    def me(user: UserDep, s: api.SessionDep) -> dict[str, Any]:
        return {"id": user.id, "name": user.name, "is_admin": user.is_admin, "credit_line": user.credit_line,
                "standing": review.standing(s, user.id)}

    app.include_router(blob_router(api))
    app.include_router(upload_router(api, uploads or UploadArea(blobs)))
    app.include_router(job_router(api))
    app.include_router(worker_router(api))

    @app.get("/metrics", include_in_schema=False)
    def metrics_page(s: SessionDep, authorization: Annotated[str, Header()] = "") -> Response:
        """Prometheus metrics. Open unless RENDERHIVE_METRICS_TOKEN is set (then: Authorization: Bearer)."""
        want = os.environ.get("RENDERHIVE_METRICS_TOKEN", "")
        if want and not hmac.compare_digest(authorization.encode(), f"Bearer {want}".encode()):
            raise HTTPException(401, "metrics need 'Authorization: Bearer <RENDERHIVE_METRICS_TOKEN>'")
        sealed = getattr(broker.coord, "sealed", None) if broker is not None else None
        stats = {**broker.coord.stats, **(sealed.stats if sealed else {})} if broker is not None else None
        return Response(metrics.render(s, stats),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # payments and review: estimate, deposit status, approve, reject, payouts, wallets
    app.include_router(payments_router(engine, api.get_user, api.serial, ledger, api.market, api.tiers))
    app.include_router(wallet_router(engine, api.get_user, ledger))
    _mount_web(app, engine, blobs, api.serial, ledger, api.market)
    app.add_middleware(Guard, engine=engine, blob_limit=blobs.max_bytes)  # outermost: before any body is read
    return app


def _mount_web(app: FastAPI, engine, blobs: BlobStore, serial, ledger, market) -> None:
    """The approval pages (farm.web.pages) and their static files; page errors are HTML, API errors JSON."""
    from fastapi.responses import HTMLResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from farm.web import pages as web
    from farm.web import payments as payments_api
    from farm.web.previews import PreviewCache

    previews = PreviewCache(blobs.root.parent / "previews")
    app.mount("/static", StaticFiles(directory=web.HERE / "static"), name="static")
    app.include_router(web.web_router(engine, blobs, previews, serial, ledger, review, payments_api, market))

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
        response = _page_error(request, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})   # Retry-After, Upload-Offset
        return response

    @app.exception_handler(jobs.JobError)
    async def _job_error(request, exc: jobs.JobError):
        return _page_error(request, exc.status, str(exc))
