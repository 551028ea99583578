"""HTTP routes of a creator's own wallet: link it (Sign-In with Ethereum), move the custodial balance to it,
and what it signs or sends for a job (deposit transactions, Approve and Reject typed data).

Thin routes over :mod:`farm.payments.own_wallets` (chain I/O in a thread). The signatures themselves are
sent to ``POST /api/jobs/{id}/approve`` and ``/reject`` (:mod:`farm.web.payments`), which check them.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from common import eth_sign
from farm.kinds import jobs
from farm.payments import own_wallets
from farm.payments.ledger import Ledger, LedgerError
from farm.store.db import session as new_session
from farm.store.models import User
from farm.web import review


class ChallengeRequest(BaseModel):
    address: str = Field(max_length=64, description="the wallet address to link (0x and 40 hex digits)")


class LinkRequest(BaseModel):
    message: str = Field(max_length=eth_sign.MAX_SIWE_MESSAGE, description="the sign-in message, unchanged")
    signature: str = Field(max_length=eth_sign.MAX_SIGNATURE, description="its personal_sign signature (0x-hex)")


class RejectionRequest(BaseModel):
    frames: str | list[int] = Field(description="frames to re-render: '3,7-9' or [3, 7, 8, 9]")
    reason: str = Field("", max_length=1000)


def wallet_router(engine, get_user: Callable, ledger: Ledger | None) -> APIRouter:
    """The API's wallet routes, behind the bearer token (``get_user``)."""
    router = APIRouter(prefix="/api", tags=["wallets"])
    add_routes(router, engine, ledger, get_user)
    return router


def add_routes(router: APIRouter, engine, ledger: Ledger | None, get_user: Callable,
               job_path: str = "/jobs/{job_id}") -> None:
    """Add the wallet routes to ``router``, each for the user ``get_user`` (a FastAPI dependency) gives:
    the API's bearer token, or the page's session cookie and CSRF header (farm/web/wallet_pages.py)."""

    async def run(fn: Callable[..., Any]) -> Any:
        if ledger is None:
            raise HTTPException(503, "payments are off on this coordinator (farm serve --chain-rpc off)")

        def work():
            with new_session(engine) as s:
                return fn(s)
        try:
            return await asyncio.to_thread(work)
        except LedgerError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except jobs.JobError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @router.get("/wallet/state")
    async def wallet_state(user: User = Depends(get_user)) -> dict[str, Any]:
        """Your wallet: custodial or your own, its address and balances, and the chain to use."""
        return await run(lambda s: own_wallets.wallet_view(ledger, s, user))

    @router.post("/wallet/challenge")
    async def wallet_challenge(body: ChallengeRequest, request: Request,
                               user: User = Depends(get_user)) -> dict[str, Any]:
        """A Sign-In with Ethereum message linking ``address`` to your account; sign it with personal_sign
        and send it to POST /api/wallet/link within 10 minutes."""
        domain = request.headers.get("host", "renderhive")[:200]
        return await run(lambda s: own_wallets.challenge(ledger, s, user, body.address, domain,
                                                          str(request.base_url)))

    @router.post("/wallet/link")
    async def wallet_link(body: LinkRequest, user: User = Depends(get_user)) -> dict[str, Any]:
        """Link the wallet that signed the sign-in message: your new jobs are paid from it, and approved or
        rejected only by its signatures."""
        return await run(lambda s: own_wallets.link(ledger, s, user, body.message, body.signature))

    @router.post("/wallet/move")
    async def wallet_move(user: User = Depends(get_user)) -> dict[str, Any]:
        """Send what your custodial wallet holds (tokens, and escrow credit) to your linked wallet."""
        return await run(lambda s: own_wallets.move_custodial(ledger, s, user))

    @router.get(job_path + "/deposit")
    async def job_deposit(job_id: int, user: User = Depends(get_user)) -> dict[str, Any]:
        """A job paid from your own wallet: the transactions that wallet sends to deposit (token allowance,
        then open_job), and whether the deposit is there."""
        return await run(lambda s: own_wallets.deposit_terms(ledger, s, review._own_job(s, job_id, user)))

    @router.get(job_path + "/approval")
    async def job_approval(job_id: int, user: User = Depends(get_user)) -> dict[str, Any]:
        """The EIP-712 Approve of the payout list on chain, for your wallet's eth_signTypedData_v4, with the
        list itself."""
        return await run(lambda s: own_wallets.approval_request(ledger, s, review._own_job(s, job_id, user)))

    @router.post(job_path + "/rejection")
    async def job_rejection(job_id: int, body: RejectionRequest, user: User = Depends(get_user)) -> dict[str, Any]:
        """The EIP-712 Reject of these frames and reason, for your wallet to sign; then POST the same frames,
        reason and the signature to /api/jobs/{id}/reject."""
        try:
            _, _, record = review.reject_record(body.frames, body.reason)
        except (jobs.JobError, ValueError, TypeError) as exc:
            raise HTTPException(getattr(exc, "status", 422), str(exc)) from None
        return await run(lambda s: own_wallets.rejection_request(ledger, s, review._own_job(s, job_id, user), record))
