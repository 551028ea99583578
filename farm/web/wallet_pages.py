"""The page's side of a creator's own wallet: the JSON calls static/wallet.js makes for the signed-in creator.

The browser wallet (any EIP-1193 provider: ``window.ethereum`` of MetaMask, Rabby, Frame, a WalletConnect
bridge) signs; these routes hand it what to sign or send and take the signatures back. They are the API's
wallet routes (:mod:`farm.web.wallet_api`, :mod:`farm.web.payments`) behind the page's session cookie
instead of a bearer token, and every POST carries the session's CSRF token in an ``X-CSRF-Token`` header
(a JSON body cannot be sent cross-site without CORS, and the header is checked anyway).
"""
from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, Callable

from fastapi import APIRouter, HTTPException, Request

from farm.kinds.jobs import JobError
from farm.payments import own_wallets
from farm.payments.ledger import LedgerError
from farm.store.db import session as new_session
from farm.web import review

MAX_BODY = 8 * 1024  # bytes of a wallet call's JSON body (a signed SIWE message is ~600)


def add_wallet_routes(router: APIRouter, engine, serial: Callable, ledger, current: Callable) -> None:
    async def body_of(request: Request, ws) -> dict[str, Any]:
        if not secrets.compare_digest(request.headers.get("x-csrf-token", ""), ws.csrf):
            raise HTTPException(403, "this request did not come from this site's page: reload the page and try again")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPException(413, f"a wallet call's body is at most {MAX_BODY} bytes")
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise HTTPException(422, "the body must be JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "the body must be a JSON object")
        return data

    async def run(fn: Callable[..., Any], *args) -> Any:
        if ledger is None:
            raise HTTPException(503, "payments are off on this coordinator")
        try:
            return await asyncio.to_thread(fn, *args)
        except LedgerError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except JobError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    def with_session(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args):
            with new_session(engine) as s:
                return fn(s, *args)
        return call

    def wake() -> None:
        if ledger is not None and getattr(ledger, "wake_hook", None):
            ledger.wake_hook()

    @router.get("/wallet/state")
    async def state(request: Request) -> dict[str, Any]:
        user, _ = current(request)
        return await run(with_session(lambda s: own_wallets.wallet_view(ledger, s, user)))

    @router.post("/wallet/challenge")
    async def challenge(request: Request) -> dict[str, Any]:
        user, ws = current(request)
        data = await body_of(request, ws)
        domain = request.headers.get("host", "renderhive")[:200]
        return await run(with_session(lambda s: own_wallets.challenge(ledger, s, user, str(data.get("address", "")),
                                                                      domain, str(request.base_url))))

    @router.post("/wallet/link")
    async def link(request: Request) -> dict[str, Any]:
        user, ws = current(request)
        data = await body_of(request, ws)
        return await run(with_session(lambda s: own_wallets.link(ledger, s, user, str(data.get("message", "")),
                                                                 str(data.get("signature", "")))))

    @router.post("/wallet/move")
    async def move(request: Request) -> dict[str, Any]:
        user, ws = current(request)
        await body_of(request, ws)
        return await run(with_session(lambda s: own_wallets.move_custodial(ledger, s, user)))

    @router.get("/jobs/{job_id}/wallet/deposit")
    async def deposit(request: Request, job_id: int) -> dict[str, Any]:
        user, _ = current(request)
        return await run(with_session(lambda s: own_wallets.deposit_terms(ledger, s, review._own_job(s, job_id, user))))

    @router.get("/jobs/{job_id}/wallet/approval")
    async def approval(request: Request, job_id: int) -> dict[str, Any]:
        user, _ = current(request)
        return await run(with_session(
            lambda s: own_wallets.approval_request(ledger, s, review._own_job(s, job_id, user))))

    @router.post("/jobs/{job_id}/wallet/approve")
    async def approve(request: Request, job_id: int) -> dict[str, Any]:
        user, ws = current(request)
        data = await body_of(request, ws)
        await run(own_wallets.accept_signature, ledger, engine, job_id, user, "approve", str(data.get("signature", "")))
        view = await serial(review.approve_job, engine, job_id, user)
        wake()
        return {"status": view["status"]}

    @router.post("/jobs/{job_id}/wallet/rejection")
    async def rejection(request: Request, job_id: int) -> dict[str, Any]:
        user, ws = current(request)
        data = await body_of(request, ws)
        try:
            _, _, record = review.reject_record(data.get("frames", ""), str(data.get("reason", "")))
        except (JobError, ValueError, TypeError) as exc:
            raise HTTPException(getattr(exc, "status", 422), str(exc)) from None
        return await run(with_session(
            lambda s: own_wallets.rejection_request(ledger, s, review._own_job(s, job_id, user), record)))

    @router.post("/jobs/{job_id}/wallet/reject")
    async def reject(request: Request, job_id: int) -> dict[str, Any]:
        user, ws = current(request)
        data = await body_of(request, ws)
        frames, reason = data.get("frames", ""), str(data.get("reason", ""))
        try:
            _, _, record = review.reject_record(frames, reason)
        except (JobError, ValueError, TypeError) as exc:
            raise HTTPException(getattr(exc, "status", 422), str(exc)) from None
        sig = await run(own_wallets.accept_signature, ledger, engine, job_id, user, "reject",
                        str(data.get("signature", "")), record)
        view = await serial(review.reject_job, engine, job_id, user, frames, reason, None, sig)
        wake()
        return {"status": view["status"], "requeued_tasks": view.get("requeued_tasks", 0)}


def own_wallet_job(engine, ledger, job_id: int, user) -> bool:
    """Whether the job page should review this job through the creator's own wallet."""
    if ledger is None or ledger.chain is None:
        return False
    with new_session(engine) as s:
        job = review._own_job(s, job_id, user)
        return own_wallets.is_own(ledger, s, job)
