"""Quotes and tiers: what a job will pay per unit, fixed when it is submitted.

A creator chooses a **tier** — who may render the job — and pays its multiplier on the market price
(:mod:`farm.payments.market`): ``any`` (every worker past probation), ``trusted`` (reputation tier
trusted or top), ``top`` (top only), by default 1×, 1.5×, 2× (``RENDERHIVE_TIER_MULTIPLIERS``,
``any=1,trusted=1.5,top=2``). A job with a positive ``priority`` (it is leased before others) pays the
**priority** multiplier on top (1.25×, ``RENDERHIVE_PRIORITY_MULTIPLIER``). The tier is the job's
``min_tier`` (the scheduler's filter, :mod:`farm.core.assignment`), so the workers who render a higher
tier's job are those of that tier, and they earn its multiplier: the job's rate is what every unit of its
measured work pays, checks included.

A **quote** — the market price, the tier, the multipliers, the rate (price × multipliers, wei per unit),
the estimated cost and the deposit at that rate, the ETA — is stored in the job's spec at submit
(``spec["quote"]``) and never changed: the deposit taken (:func:`farm.payments.pricing.estimate_job`) and
the payouts (:func:`farm.payments.pricing.shares`) use it however the market moves later. A job stored
without one (created outside the API) pays the fixed ``Pricing.price_per_unit``. ``max_price`` refuses a
submit whose rate would be above it (tokens per unit), before anything is written.

A job **probed** first (farm.kinds.probe: no history for its scene) gets its rate at submit all the same
(the price per unit does not depend on the scene, so ``max_price`` is still a 409 at once and nothing is
written), with ``probing: true`` and the guessed cost; when the probe is measured, :class:`ProbeQuotes`
re-makes the quote's seconds per unit, cost, deposit and ETA at that locked rate, adds what the probe
costs (``probe_cost``: paid by the job's deposit, farm.payments.pricing ``probe_work``), and only then is
the job funded: the deposit taken is the probed one.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from sqlmodel import Session

from farm.kinds import probe as probes
from farm.kinds.jobs import PRICED_TIERS
from farm.payments import pricing as pr
from farm.payments.market import Market
from farm.store.models import Job

TIERS = tuple(PRICED_TIERS)  # each stands for a min_tier (farm.kinds.jobs.min_tier)
DEFAULT_MULTIPLIERS = "any=1,trusted=1.5,top=2"


class QuoteRefused(ValueError):
    """A submit the farm will not quote as asked; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


def _bps(x: str | Decimal) -> int:
    return int(Decimal(str(x)) * pr.BPS)


@dataclass(frozen=True)
class TierTerms:
    multipliers: tuple[tuple[str, int], ...] = (("any", 10_000), ("trusted", 15_000), ("top", 20_000))  # bps
    priority_bps: int = 12_500

    @classmethod
    def from_env(cls) -> "TierTerms":
        raw = os.environ.get("RENDERHIVE_TIER_MULTIPLIERS") or DEFAULT_MULTIPLIERS
        try:
            given = dict((k.strip(), _bps(v)) for k, v in (p.split("=") for p in raw.split(",") if p.strip()))
            prio = _bps(os.environ.get("RENDERHIVE_PRIORITY_MULTIPLIER") or "1.25")
        except (ValueError, InvalidOperation):
            raise ValueError(f"RENDERHIVE_TIER_MULTIPLIERS={raw!r}: write tier=multiplier pairs, e.g. "
                             f"{DEFAULT_MULTIPLIERS}") from None
        mults = dict(cls.multipliers) | given
        if set(mults) != set(TIERS) or any(v <= 0 for v in mults.values()) or prio <= 0:
            raise ValueError(f"RENDERHIVE_TIER_MULTIPLIERS={raw!r}: name only {', '.join(TIERS)}, with positive "
                             "multipliers (and a positive RENDERHIVE_PRIORITY_MULTIPLIER)")
        return cls(tuple((t, mults[t]) for t in TIERS), prio)

    def multiplier_bps(self, tier: str, priority: int = 0) -> int:
        bps = dict(self.multipliers)[tier]
        return bps * self.priority_bps // pr.BPS if priority > 0 else bps

    def table(self) -> dict[str, str]:
        return {t: _x(b) for t, b in self.multipliers} | {"priority": _x(self.priority_bps)}


def _x(bps: int) -> str:
    return format((Decimal(bps) / pr.BPS).normalize(), "f")


def tier_of(req: dict[str, Any]) -> str:
    """The tier a request asks for: ``tier``, else from ``min_tier`` (none or ``new`` is ``any``)."""
    tier = str(req.get("tier") or "")
    if tier:
        if tier not in TIERS:
            raise QuoteRefused(f"tier must be one of {', '.join(TIERS)}, got {tier!r:.40}", 422)
        return tier
    return {"trusted": "trusted", "top": "top"}.get(str(req.get("min_tier") or ""), "any")


def max_price(req: dict[str, Any]) -> int | None:
    """The request's ``max_price`` (tokens per unit) in wei, or None."""
    raw = req.get("max_price")
    if raw in (None, ""):
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        value = Decimal(-1)
    if not value.is_finite() or value <= 0:
        raise QuoteRefused(f"max_price must be a positive number of tokens per unit, got {raw!r:.40}", 422)
    return pr.to_wei(value)


@dataclass(frozen=True)
class Offer:
    """The price part of a quote, decided before the job is written."""
    price: int  # the market's wei per unit now
    tier: str
    multiplier_bps: int
    rate: int  # what the job pays per unit: price × multiplier
    load: float

    def view(self) -> dict[str, Any]:
        return {"price_per_unit": str(self.price), "price_per_unit_tokens": pr.tokens(self.price),
                "tier": self.tier, "multiplier": _x(self.multiplier_bps), "rate": str(self.rate),
                "rate_tokens": pr.tokens(self.rate), "load": round(self.load, 4)}


def offer(market: Market, tiers: TierTerms, req: dict[str, Any]) -> Offer:
    """The rate a request would be quoted now. Raises QuoteRefused when it is above the request's max_price."""
    tier, limit = tier_of(req), max_price(req)
    mult = tiers.multiplier_bps(tier, int(req.get("priority") or 0))
    price = market.price()
    rate = price * mult // pr.BPS
    if limit is not None and rate > limit:
        raise QuoteRefused(
            f"the price now is {pr.tokens(rate)} tokens per unit ({pr.tokens(price)} market price × {_x(mult)} for "
            f"tier {tier}{' with priority' if int(req.get('priority') or 0) > 0 else ''}), above your max_price of "
            f"{pr.tokens(limit)}: submit later (the price follows the queue; GET /api/market shows it), raise "
            "--max-price, or choose a lower tier or no priority", 409)
    return Offer(price, tier, mult, rate, market.load())


def estimate_request(s: Session, pricing: pr.Pricing, market: Market, tiers: TierTerms,
                     req: dict[str, Any], probing: bool = False) -> dict[str, Any]:
    """POST /api/estimate: the estimate at the rate the request would be quoted now, the tier table, and
    whether a submit would be probed first (``probing``: this farm probes new scenes)."""
    o = offer(market, tiers, {**req, "max_price": None})
    est = pr.estimate_request(s, pricing, req, o.rate)
    scene = str(req.get("scene_sha256") or "")
    would = probing and not probes.has_history(s, scene, pr.request_settings(req))
    probe = {"would_probe": would,
             "why": ("no render history for this scene and settings: a submit renders one frame at low "
                     "resolution first, and the quote (cost, deposit, ETA) is made from it" if would else
                     "this farm does not probe new scenes (RENDERHIVE_PROBE)" if not probing else
                     "the farm has rendered this scene with these settings: the estimate is from that history")}
    return {**est, "quote": {**o.view(), "cost": est["cost"], "cost_tokens": est["cost_tokens"],
                             "deposit": est["deposit"], "deposit_tokens": est["deposit_tokens"]},
            "tiers": tiers.table(), "probe": probe}


def lock(s: Session, pricing: pr.Pricing, job: Job, o: Offer, queue: dict[str, Any] | None,
         probing: bool = False) -> dict[str, Any]:
    """Store the quote in a newly created job (a retried submit's job keeps the quote it has). ``probing``:
    the job is probed first; its cost and deposit here are the guess, re-made by :class:`ProbeQuotes`."""
    if "quote" in job.spec:
        return job.spec["quote"]
    est = pr.estimate_job(s, pricing, job, o.rate)
    quote = {**o.view(), "units": est["units"], "seconds_per_unit": est["seconds_per_unit"], "basis": est["basis"],
             "cost": est["cost"], "cost_tokens": est["cost_tokens"], "deposit": est["deposit"],
             "deposit_tokens": est["deposit_tokens"], "fee_bps": pricing.fee_bps, "quoted_at": time.time(),
             "eta_seconds": (queue or {}).get("eta_seconds"), "probing": probing}
    if probing:
        quote["basis"] = f"probing (until then: {est['basis']})"
    job.spec = {**job.spec, "quote": quote}
    s.add(job)
    return quote


class ProbeQuotes:
    """The core's :class:`farm.kinds.probe.Quoting`: a probed job's quote re-made at its locked rate.
    ``eta``: the job's ETA now (``farm serve`` passes the queue view's), or None."""

    def __init__(self, pricing: pr.Pricing | None = None,
                 eta: Callable[[Session, Job], float | None] | None = None):
        self.pricing = pricing or pr.Pricing.from_env()
        self.eta = eta

    def quote_probed(self, s: Session, job: Job, seconds_per_unit: float, basis: str) -> dict[str, Any]:
        old = job.spec.get("quote") or {}
        rate = int(old["rate"]) if old.get("rate") else pr.job_rate(self.pricing, job)
        units = int(old.get("units") or job.tasks_total or 1)
        est = pr.priced(self.pricing, units, seconds_per_unit, basis, rate)
        fraction = float((job.spec.get("probe") or {}).get("fraction") or 1.0)
        probe_cost = self.pricing.cost(int(round(seconds_per_unit * fraction * 1000)), rate)
        quote = {**old, "units": units, "seconds_per_unit": est["seconds_per_unit"], "basis": basis,
                 "cost": est["cost"], "cost_tokens": est["cost_tokens"], "deposit": est["deposit"],
                 "deposit_tokens": est["deposit_tokens"], "probing": False, "probed_at": time.time(),
                 "probe_cost": str(probe_cost), "probe_cost_tokens": pr.tokens(probe_cost),
                 "guess": {k: old.get(k) for k in ("seconds_per_unit", "cost_tokens", "deposit_tokens")}}
        job.spec = {**job.spec, "quote": quote}
        if self.eta is not None:
            quote["eta_seconds"] = self.eta(s, job)
            job.spec = {**job.spec, "quote": quote}
        return quote
