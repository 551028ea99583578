"""Workers' view of the money: the current price, and each worker's credited share of a job, as protocol
messages (PRICE, EARNED) for the coordinator to send over the worker plane (the port
:class:`farm.core.earnings_port.Earnings`), and for the Workers page.

:func:`current_price` is the one function that says what the farm pays now: the market price
(:mod:`farm.payments.market`, wei per reference second of measured work, set by the farm's load within the
operator's floor and ceiling), or the fixed :attr:`Pricing.price_per_unit` without a market. PRICE, ``farm
worker`` and the Workers page follow it. (A job pays the price locked at its submit × its tier's multiplier,
:mod:`farm.payments.quotes`: a trusted-tier job pays its trusted workers 1.5 × by default.) Invariants:

* PRICE is sent after every WELCOME, and again to every connected worker when the price moved by more
  than :data:`PRICE_STEP` of the last one announced, at most every :data:`PRICE_EVERY` seconds
  (:meth:`WorkerEarnings.moved`, each sweep): ``farm worker`` shows the live price without a message a
  sweep for every tick of the market;

* a share is announced only once its round is ``credited`` (the creator approved it): a computed or
  posted list may still be rejected;
* finding new credits costs one indexed query a second (settlements not yet credited, by status), and
  then only the payouts of the jobs that left that set: nothing scans the payout table.
"""
from __future__ import annotations

import math
import os

from sqlmodel import Session, func, select

from common import protocol as P
from farm.payments import pricing as pr
from farm.payments.market import Market
from farm.store.ledger_models import Payout, PayoutStatus, Settlement, SettlementStatus

UNIT = "reference second of measured work"
"""What a unit of paid work is (pricing.py: the job's fastest measured seconds per frame, tile, image)."""

RECENT_JOBS = 50
"""Newest settled jobs whose credited shares a worker hears of after its HELLO (at most RECENT_SHARES)."""
RECENT_SHARES = 8
CHECK_INTERVAL = 1.0
"""Seconds between two looks for newly credited shares."""
PRICE_STEP = float(os.environ.get("RENDERHIVE_PRICE_NOTIFY_STEP") or 0.02)
"""A move of the price by more than this share of the last announced one is sent to the connected workers."""
PRICE_EVERY = float(os.environ.get("RENDERHIVE_PRICE_NOTIFY_SECONDS") or 30)
"""Seconds at least between two announcements of a moved price."""

_UNCREDITED = (SettlementStatus.new.value, SettlementStatus.funding.value, SettlementStatus.open.value,
               SettlementStatus.posted.value, SettlementStatus.disputed.value)
_CREDITED = (SettlementStatus.approved.value, SettlementStatus.paid.value)


def current_price(pricing: pr.Pricing, market: Market | None = None) -> int:
    """Wei the farm pays now per unit of measured work of an any-tier job (see the module docstring)."""
    return market.price() if market is not None else pricing.price_per_unit


def earned(p: Payout) -> P.Earned:
    ms = p.work_ms + p.check_ms
    rate = int(p.amount) * 1000 // ms if ms else 0  # what was paid per unit (less than the price when capped)
    return P.Earned(p.job_id, str(p.amount), pr.tokens(p.amount), p.work_ms / 1000, p.tasks,
                    p.check_ms / 1000, p.checks, pr.tokens(rate))


class WorkerEarnings:
    """The core's :class:`~farm.core.earnings_port.Earnings`. ``payments``: False when the farm runs without
    a chain (``farm serve --chain-rpc off``): PRICE then says nothing is paid."""

    def __init__(self, pricing: pr.Pricing | None = None, payments: bool = True, market: Market | None = None):
        self.pricing = pricing or pr.Pricing.from_env()
        self.payments = payments
        self.market = market
        self._waiting: set[int] | None = None  # jobs whose shares are not credited yet (None: not looked yet)
        self._looked = 0.0
        self._newest = 0  # the newest settlement's job id at the last look
        self._told: int | None = None  # the price last announced (wei per unit)
        self._told_at = -math.inf      # when a moved price was last announced (the coordinator's clock)

    def price(self) -> P.Price:
        note = "" if self.payments else "payments are off on this farm (farm serve --chain-rpc off): no job pays"
        wei = current_price(self.pricing, self.market)
        self._told = wei if self._told is None else self._told  # a later move is measured from the first told
        return P.Price(pr.tokens(wei), UNIT, note)

    def moved(self, now: float) -> P.Price | None:
        """PRICE for every connected worker when the price moved past PRICE_STEP since the last announced one
        and PRICE_EVERY seconds have passed since the last such announcement; else None."""
        if self.market is None or not self.payments or now - self._told_at < PRICE_EVERY:
            return None
        wei = current_price(self.pricing, self.market)
        if self._told is not None and abs(wei - self._told) <= PRICE_STEP * self._told:
            return None
        self._told, self._told_at = wei, now
        return P.Price(pr.tokens(wei), UNIT, "")

    def recent(self, s: Session, worker_id: str) -> list[P.Earned]:
        jobs = s.exec(select(Settlement.job_id).where(Settlement.status.in_(_CREDITED))
                      .order_by(Settlement.job_id.desc()).limit(RECENT_JOBS)).all()
        if not jobs:
            return []
        rows = s.exec(select(Payout).where(Payout.job_id.in_(jobs)).where(Payout.worker_id == worker_id)
                      .where(Payout.status == PayoutStatus.credited.value)
                      .order_by(Payout.job_id.desc()).limit(RECENT_SHARES)).all()
        return [earned(p) for p in reversed(rows)]

    def credited(self, s: Session, now: float) -> list[tuple[str, P.Earned]]:
        if now - self._looked < CHECK_INTERVAL:
            return []
        self._looked = now
        waiting = set(s.exec(select(Settlement.job_id).where(Settlement.status.in_(_UNCREDITED))).all())
        newest = s.exec(select(func.max(Settlement.job_id))).one() or 0
        fresh = set() if self._waiting is None else set(s.exec(
            select(Settlement.job_id).where(Settlement.job_id > self._newest)
            .where(Settlement.status.in_(_CREDITED))).all())  # created and credited between two looks
        moved, self._waiting, self._newest = ((self._waiting or set()) - waiting) | fresh, waiting, newest
        if not moved:
            return []
        rows = s.exec(select(Payout).where(Payout.job_id.in_(sorted(moved)))
                      .where(Payout.status == PayoutStatus.credited.value).order_by(Payout.job_id)).all()
        return [(p.worker_id, earned(p)) for p in rows]
