"""HTTP routes of payments and review: estimate, deposit status, approve, reject, payouts, wallets.

Mounted by :func:`farm.web.app.create_app` (``ledger`` is None when payments are off: approve and reject
still work, the money routes answer 503). Thin routes: review runs on the coordinator's thread through
``serial`` (it changes tasks), chain reads and writes go through :class:`farm.payments.ledger.Ledger`. Amounts are
given twice: in the token's smallest unit (decimal strings) and in tokens (``*_tokens``).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import APIRouter, Body, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from farm.kinds import jobs
from farm.kinds.jobs import JobError
from farm.kinds.probe import farm_probes
from farm.payments import own_wallets, quotes
from farm.payments import pricing as pr
from farm.payments.ledger import Ledger, LedgerError
from farm.payments.market import Market
from farm.store.db import session as new_session
from farm.store.ledger_models import ChainEvent, ChainTx, Payout, Settlement
from farm.store.models import Job, User
from farm.web import review


class RejectRequest(BaseModel):
    frames: str | list[int] = Field(description="frames to re-render: '3,7-9' or [3, 7, 8, 9]")
    reason: str = Field("", max_length=1000)
    signature: str = Field("", max_length=200, description="a wallet of your own: its EIP-712 Reject of the "
                           "typed data POST /api/jobs/{id}/rejection gives (0x-hex)")


class ApproveRequest(BaseModel):
    signature: str = Field("", max_length=200, description="a wallet of your own: its EIP-712 Approve of the "
                           "typed data GET /api/jobs/{id}/approval gives (0x-hex)")


def payment_view(s: Session, ledger: Ledger | None, job: Job) -> dict[str, Any]:
    """Deposit and settlement status of a job, with its transactions and escrow events."""
    st = s.get(Settlement, job.id)
    view: dict[str, Any] = {"job_id": job.id, "job_status": job.status, "payments": "on" if ledger else "off",
                            "status": st.status if st else "none"}
    if ledger is None or st is None:
        return view
    dep = ledger.deployment
    view.update({"estimate": st.estimate, "estimate_tokens": pr.tokens(st.estimate), "deposit": st.deposit,
                 "deposit_tokens": pr.tokens(st.deposit), "payout_total": st.payout_total,
                 "payout_total_tokens": pr.tokens(st.payout_total), "fee": st.fee, "fee_tokens": pr.tokens(st.fee),
                 "fee_bps": ledger.pricing.fee_bps, "capped": st.capped, "round": st.round,
                 "creator_wallet": st.creator, "escrow": dep.get("escrow"), "token": dep.get("token"),
                 "escrow_job": st.escrow_job, "deadline": st.deadline, "error": st.error,
                 "reject_pending": st.reject_pending})
    view["transactions"] = [{"kind": t.kind, "tx_hash": t.tx_hash, "status": t.status, "block": t.block,
                             "gas_used": t.gas_used, "detail": t.detail}
                            for t in s.exec(select(ChainTx).where(ChainTx.job_id == job.id).order_by(ChainTx.id))]
    view["events"] = [{"name": e.name, "block": e.block, "tx_hash": e.tx_hash}
                      for e in s.exec(select(ChainEvent).where(ChainEvent.job_id == job.id).order_by(ChainEvent.id))]
    return view


def payouts_view(s: Session, ledger: Ledger | None, job: Job) -> dict[str, Any]:
    """Each worker's share: the newest computed list, or a live preview while the job renders."""
    st = s.get(Settlement, job.id)
    pricing = ledger.pricing if ledger else pr.Pricing.from_env()
    rows: list[dict[str, Any]] = []
    preview = st is None or st.payout_round == 0
    if not preview:
        for p in s.exec(select(Payout).where(Payout.job_id == job.id).where(Payout.round == st.payout_round)
                        .order_by(Payout.worker_id)):
            rows.append({"worker_id": p.worker_id, "wallet": p.wallet, "work_seconds": p.work_ms / 1000,
                         "tasks": p.tasks, "check_seconds": p.check_ms / 1000, "checks": p.checks,
                         "amount": p.amount, "amount_tokens": pr.tokens(p.amount), "status": p.status})
    else:
        deposit = int(st.deposit) if st else 10**40
        from farm.payments.chain import checksum
        shares, _ = pr.shares(s, pricing, job.id, deposit, checksum)
        rows = [{"worker_id": x.worker_id, "wallet": x.wallet, "work_seconds": x.work_ms / 1000, "tasks": x.tasks,
                 "check_seconds": x.check_ms / 1000, "checks": x.checks, "amount": str(x.amount), "amount_tokens": pr.tokens(x.amount),
                 "status": "preview" if x.wallet else "unpayable"} for x in shares]
    total = sum(int(r["amount"]) for r in rows if r["wallet"])
    return {"job_id": job.id, "preview": preview, "round": st.payout_round if st else 0,
            "status": st.status if st else "none", "price_per_unit_tokens": pr.tokens(pr.job_rate(pricing, job)),
            "unit": "reference second (measured)", "total": str(total), "total_tokens": pr.tokens(total), "workers": rows}


def payments_router(engine, get_user: Callable, serial: Callable, ledger: Ledger | None, market: Market,
                    tiers: quotes.TierTerms) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["payments"])

    def get_session():
        with new_session(engine) as s:
            yield s

    def need_ledger() -> Ledger:
        if ledger is None:
            raise HTTPException(503, "payments are off on this coordinator (farm serve --chain-rpc off)")
        return ledger

    def poke() -> None:
        if ledger is not None and ledger.wake_hook:
            ledger.wake_hook()

    async def chain_call(fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except LedgerError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @router.post("/estimate")
    def estimate(body: dict[str, Any] = Body(..., examples=[{"frames": "1-240", "samples": 64}]),
                 user: User = Depends(get_user), s: Session = Depends(get_session)) -> dict[str, Any]:
        """What a job would cost (the rate it would be quoted now — market price × its tier's multiplier —
        × a seconds-per-frame guess) and the deposit it takes at start, with the tiers' multipliers. The body
        is that of POST /api/jobs (``scene_sha256`` optional: with it, earlier renders of the same scene and
        settings make the guess; ``tier`` and ``priority`` choose the multiplier)."""
        pricing = ledger.pricing if ledger else pr.Pricing.from_env()
        try:
            return quotes.estimate_request(s, pricing, market, tiers, body, probing=farm_probes(ledger is not None))
        except quotes.QuoteRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise HTTPException(422, f"cannot estimate this job: {exc}") from None

    @router.get("/market")
    def market_now(user: User = Depends(get_user)) -> dict[str, Any]:
        """The price now (tokens per unit of measured work), the load behind it, its bounds, the tiers."""
        return {**market.view(), "tiers": tiers.table(), "unit": "reference second (measured)"}

    @router.get("/jobs/{job_id}/payment")
    def payment(job_id: int, user: User = Depends(get_user), s: Session = Depends(get_session)) -> dict[str, Any]:
        return payment_view(s, ledger, jobs.get_job(s, job_id, user))

    @router.get("/jobs/{job_id}/payouts")
    def payouts(job_id: int, user: User = Depends(get_user), s: Session = Depends(get_session)) -> dict[str, Any]:
        return payouts_view(s, ledger, jobs.get_job(s, job_id, user))

    async def own_signature(job_id: int, user: User, kind: str, signature: str, record: str = "") -> str:
        if ledger is None:
            return ""
        try:
            return await chain_call(own_wallets.accept_signature, ledger, engine, job_id, user, kind, signature,
                                    record)
        except JobError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @router.post("/jobs/{job_id}/approve")
    async def approve(job_id: int, body: ApproveRequest | None = Body(None),
                      user: User = Depends(get_user)) -> dict[str, Any]:
        """Approve a rendered job: the escrow pays its workers. Approving twice pays once. A job paid from
        the creator's own wallet needs that wallet's signature (``signature``)."""
        await own_signature(job_id, user, "approve", body.signature if body else "")
        view = await serial(review.approve_job, engine, job_id, user)
        poke()
        return view

    @router.post("/jobs/{job_id}/reject")
    async def reject(job_id: int, body: RejectRequest, user: User = Depends(get_user)) -> dict[str, Any]:
        """Reject frames of a rendered job: they are rendered again, then the job can be approved. A job paid
        from the creator's own wallet needs that wallet's signature of the rejection (``signature``)."""
        try:
            _, _, record = review.reject_record(body.frames, body.reason)
        except JobError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        sig = await own_signature(job_id, user, "reject", body.signature, record)
        view = await serial(review.reject_job, engine, job_id, user, body.frames, body.reason, None, sig)
        poke()
        return view

    @router.get("/wallet")
    async def my_wallet(user: User = Depends(get_user)) -> dict[str, Any]:
        """The caller's wallet and its balances: custodial (the farm holds its key), or linked (their own)."""
        led = need_ledger()

        def read():
            with new_session(engine) as s:
                return own_wallets.wallet_view(led, s, user)
        return await chain_call(read)

    @router.get("/wallets/{address}")
    async def wallet(address: str, user: User = Depends(get_user)) -> dict[str, Any]:
        return await chain_call(need_ledger().balances, address)

    @router.post("/wallets/{address}/withdraw")
    async def withdraw(address: str, user: User = Depends(get_user)) -> dict[str, Any]:
        """Pay out an address's escrow credit to that address (a worker's earnings); the farm pays the gas."""
        return await chain_call(need_ledger().withdraw_for, address)

    return router
