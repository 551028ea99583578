"""The market price: what one unit of measured work (a reference second, :mod:`farm.payments.pricing`)
costs now, set by the farm's load and bounded by the operator.

Render Network prices rendering by the network's usage; this is the same idea, written down:

* **instantaneous load** ``x = queued work seconds ÷ (online slots × HORIZON)``: the work waiting or being
  rendered (units × the farm's measured seconds per unit) over what the online workers can do in
  ``horizon`` seconds. ``x = 1`` means every slot has a horizon's worth of work ahead of it. Work with no
  worker online counts as :data:`MAX_LOAD`; no work is load 0.
* **smoothed load** ``L``: an exponentially weighted moving average of ``x`` with half-life ``half_life``
  seconds, over the real time between samples (``L += (x - L) × (1 - 2^(-dt / half_life))``), so a burst
  of submits moves the price over minutes, not per second. The first sample starts it (a restart does not
  pretend the farm is idle).
* **price** ``p(L) = floor + (ceiling - floor) × L / (L + knee)``, rounded down to 1/TICKS of the band:
  ``floor`` at an idle farm, half-way at ``L = knee``, approaching ``ceiling`` as the queue grows; never
  outside ``[floor, ceiling]`` and non-decreasing in ``L`` (the tests check both).

The load is sampled at most once every ``sample_seconds`` (two aggregate queries: the queued and leased
task units, by the claim index on status; the online workers' slots), lazily when a price is asked and by
:meth:`Market.run` in ``farm serve``; nothing scans a table per step. A job's price is locked at submit
(:mod:`farm.payments.quotes`): later moves of the market never change what a submitted job pays.
"""
from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import func
from sqlmodel import select

from farm.payments import pricing as pr
from farm.store.db import session as new_session
from farm.store.models import Task, Worker
from farm.store.states import TaskStatus

TICKS = 1000
"""The price moves in steps of (ceiling - floor) / TICKS: a load that barely changed quotes the same price."""
MAX_LOAD = 100.0
"""The load of queued work that no online worker can take (and the cap of any load)."""
LOADED = (TaskStatus.queued.value, TaskStatus.assigned.value, TaskStatus.running.value)
"""Task states whose units are the farm's demand: waiting in the queue, or holding a slot now."""


@dataclass(frozen=True)
class MarketTerms:
    """The operator's bounds and the curve's shape. Every field has an environment variable."""
    floor: int = pr.to_wei("0.01")  # wei per unit at an idle farm: RENDERHIVE_PRICE_FLOOR (default PRICE_PER_UNIT)
    ceiling: int = pr.to_wei("0.04")  # the most it costs however long the queue: RENDERHIVE_PRICE_CEILING (4 × floor)
    half_life: float = 300.0  # seconds for the smoothed load to move half-way: RENDERHIVE_PRICE_HALF_LIFE
    horizon: float = 600.0  # seconds of work per slot that make load 1: RENDERHIVE_PRICE_HORIZON
    knee: float = 1.0  # the load at which the price is half-way up: RENDERHIVE_PRICE_KNEE
    sample_seconds: float = 5.0  # the load is read at most this often: RENDERHIVE_PRICE_SAMPLE_SECONDS

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling:
            raise ValueError(f"the price floor ({pr.tokens(self.floor)}) must be at most the ceiling "
                             f"({pr.tokens(self.ceiling)}): set RENDERHIVE_PRICE_FLOOR <= RENDERHIVE_PRICE_CEILING")
        if min(self.half_life, self.horizon, self.knee) <= 0 or self.sample_seconds < 0:
            raise ValueError("RENDERHIVE_PRICE_HALF_LIFE, _HORIZON and _KNEE must be positive")

    @classmethod
    def from_env(cls, pricing: pr.Pricing | None = None) -> "MarketTerms":
        base = (pricing or pr.Pricing.from_env()).price_per_unit
        env = os.environ.get
        floor = pr.to_wei(env("RENDERHIVE_PRICE_FLOOR")) if env("RENDERHIVE_PRICE_FLOOR") else base
        ceiling = pr.to_wei(env("RENDERHIVE_PRICE_CEILING")) if env("RENDERHIVE_PRICE_CEILING") else 4 * floor
        return cls(floor, ceiling, float(env("RENDERHIVE_PRICE_HALF_LIFE") or 300),
                   float(env("RENDERHIVE_PRICE_HORIZON") or 600), float(env("RENDERHIVE_PRICE_KNEE") or 1),
                   float(env("RENDERHIVE_PRICE_SAMPLE_SECONDS") or 5))


def load_of(work_seconds: float, slots: int, horizon: float) -> float:
    """The instantaneous load (module docstring)."""
    if work_seconds <= 0:
        return 0.0
    if slots <= 0:
        return MAX_LOAD
    return min(MAX_LOAD, work_seconds / (slots * horizon))


def price_at(load: float, terms: MarketTerms) -> int:
    """Wei per unit at smoothed load ``load``: bounded by the terms, non-decreasing in ``load``."""
    load = min(max(0.0, load), 1e12) if load == load else 0.0  # NaN: no load known
    ticks = min(TICKS, math.floor(TICKS * load / (load + terms.knee)))
    return terms.floor + (terms.ceiling - terms.floor) * ticks // TICKS


def smooth(previous: float, sample: float, dt: float, half_life: float) -> float:
    """One step of the EWMA over ``dt`` seconds."""
    return previous + (sample - previous) * (1 - 2 ** (-max(0.0, dt) / half_life))


LoadSource = Callable[[], tuple[float, int]]
"""Returns (queued work seconds, online slots) now."""


def farm_load(engine, pricing: pr.Pricing) -> LoadSource:
    """The load source of a farm's database: its queued and leased task units × the farm's measured
    seconds per unit, and its online workers' slots."""
    def read() -> tuple[float, int]:
        with new_session(engine) as s:
            units = s.exec(select(func.coalesce(func.sum(Task.progress_total), 0))
                           .where(Task.status.in_(LOADED)).where(Task.check_id.is_(None))).one()
            slots = s.exec(select(func.coalesce(func.sum(Worker.slots), 0)).where(Worker.online)).one()
            per, _ = pr.seconds_per_unit(s, pricing, None, None) if units else (0.0, "")
        return float(units) * per, int(slots)
    return read


class Market:
    """The farm's price now. Thread-safe: the web threads and the coordinator's thread ask it."""

    def __init__(self, terms: MarketTerms, source: LoadSource | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.terms, self.source, self.clock = terms, source, clock
        self._lock = threading.Lock()
        self._load: float | None = None  # the smoothed load; None before the first sample
        self._raw = 0.0
        self._at = -math.inf

    @classmethod
    def for_farm(cls, engine, pricing: pr.Pricing | None = None, clock: Callable[[], float] = time.monotonic):
        pricing = pricing or pr.Pricing.from_env()
        return cls(MarketTerms.from_env(pricing), farm_load(engine, pricing), clock)

    def observe(self, work_seconds: float, slots: int, now: float | None = None) -> None:
        """Feed one sample of the load (the simulation and tests call this; :meth:`sample` reads the farm)."""
        now = self.clock() if now is None else now
        raw = load_of(work_seconds, slots, self.terms.horizon)
        with self._lock:
            self._load = raw if self._load is None else smooth(self._load, raw, now - self._at, self.terms.half_life)
            self._raw, self._at = raw, now

    def sample(self, now: float | None = None) -> None:
        """Read the load from the source unless it was read less than ``sample_seconds`` ago."""
        now = self.clock() if now is None else now
        if self.source is None or now - self._at < self.terms.sample_seconds:
            return
        work, slots = self.source()
        self.observe(work, slots, now)

    def load(self) -> float:
        return self._load or 0.0

    def price(self, now: float | None = None) -> int:
        """Wei per unit of measured work now (the load is sampled first when it is stale)."""
        self.sample(now)
        return price_at(self.load(), self.terms)

    def view(self) -> dict[str, str | float]:
        """The figures behind the price, for the API and the pages."""
        price = self.price()
        return {"price_per_unit": str(price), "price_per_unit_tokens": pr.tokens(price),
                "load": round(self.load(), 4), "load_now": round(self._raw, 4),
                "floor_tokens": pr.tokens(self.terms.floor), "ceiling_tokens": pr.tokens(self.terms.ceiling),
                "half_life_seconds": self.terms.half_life, "horizon_seconds": self.terms.horizon}

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Sample every ``sample_seconds`` (``farm serve``), so the smoothing sees the load between asks."""
        while stop is None or not stop.is_set():
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(max(1.0, self.terms.sample_seconds))
