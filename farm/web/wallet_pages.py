"""The page's side of a creator's own wallet: the JSON calls static/wallet.js makes for the signed-in creator.

The browser wallet (any EIP-1193 provider: ``window.ethereum`` of MetaMask, Rabby, Frame, a WalletConnect
bridge) signs; these routes hand it what to sign or send and take the signatures back. They are the API's
wallet routes (:func:`farm.web.wallet_api.add_routes`, the same code) behind the page's session cookie
instead of a bearer token, under ``/jobs/{id}/wallet/…``, plus approve and reject with a signature (the
API's are in :mod:`farm.web.payments`); every POST carries the session's CSRF token in an
``X-CSRF-Token`` header (a JSON body cannot be sent cross-site without CORS, and the header is checked
anyway).
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from common import eth_sign
from farm.kinds.jobs import JobError
from farm.payments import own_wallets
from farm.payments.ledger import LedgerError
from farm.store.db import session as new_session
from farm.store.models import User
from farm.web import review, wallet_api


class SignedApproval(BaseModel):
    signature: str = Field(max_length=eth_sign.MAX_SIGNATURE, description="the wallet's EIP-712 signature")


class SignedRejection(wallet_api.RejectionRequest):
    signature: str = Field(max_length=eth_sign.MAX_SIGNATURE, description="the wallet's EIP-712 signature")


def add_wallet_routes(router: APIRouter, engine, serial: Callable, ledger, current: Callable) -> None:
    def page_user(request: Request) -> User:
        """The signed-in creator; a POST must carry the session's CSRF token."""
        user, ws = current(request)
        if request.method != "GET" and not secrets.compare_digest(request.headers.get("x-csrf-token", ""), ws.csrf):
            raise HTTPException(403, "this request did not come from this site's page: reload the page and try again")
        return user

    wallet_api.add_routes(router, engine, ledger, page_user, job_path="/jobs/{job_id}/wallet")

    async def run(fn: Callable[..., Any], *args) -> Any:
        if ledger is None:
            raise HTTPException(503, "payments are off on this coordinator")
        try:
            return await asyncio.to_thread(fn, *args)
        except LedgerError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except JobError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    def wake() -> None:
        if ledger is not None and getattr(ledger, "wake_hook", None):
            ledger.wake_hook()

    @router.post("/jobs/{job_id}/wallet/approve")
    async def approve(job_id: int, body: SignedApproval, user: User = Depends(page_user)) -> dict[str, Any]:
        await run(own_wallets.accept_signature, ledger, engine, job_id, user, "approve", body.signature)
        view = await serial(review.approve_job, engine, job_id, user)
        wake()
        return {"status": view["status"]}

    @router.post("/jobs/{job_id}/wallet/reject")
    async def reject(job_id: int, body: SignedRejection, user: User = Depends(page_user)) -> dict[str, Any]:
        try:
            _, _, record = review.reject_record(body.frames, body.reason)
        except (JobError, ValueError, TypeError) as exc:
            raise HTTPException(getattr(exc, "status", 422), str(exc)) from None
        sig = await run(own_wallets.accept_signature, ledger, engine, job_id, user, "reject", body.signature, record)
        view = await serial(review.reject_job, engine, job_id, user, body.frames, body.reason, None, sig)
        wake()
        return {"status": view["status"], "requeued_tasks": view.get("requeued_tasks", 0)}


def own_wallet_job(engine, ledger, job_id: int, user) -> bool:
    """Whether the job page should review this job through the creator's own wallet."""
    if ledger is None or ledger.chain is None:
        return False
    with new_session(engine) as s:
        job = review._own_job(s, job_id, user)
        return own_wallets.is_own(ledger, s, job)
