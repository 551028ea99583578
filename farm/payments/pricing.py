"""Pricing and metering: what a job is estimated to cost, what it did cost, and who earned what.

Work is **measured, not claimed**, in *reference seconds*. A job's reference work per unit (a frame, a
tile, an image) comes from the coordinator's own clock: each accepted attempt took ``ended_at -
started_at`` seconds of the coordinator's time (lease to result) for its units; the reference is the mean
of the fastest third of those per-unit times, from trusted workers when the job has any (spot-check
re-renders by other workers count: a lone worker's job still has someone else's timing). Every accepted
task is then worth its units × the reference, whoever rendered it and however long it took: a slow or
padding worker earns no more for the same frame than a fast honest one, and the seconds a worker reports
(``Attempt.render_seconds``) are a statistic only. Spot checks are paid to their verifier by the job, at
the same reference (:func:`check_work`), and shown apart in each share. The price of a unit is the
job's rate, locked in its quote at submit (farm.payments.market sets the price by load, farm.payments.quotes
adds the tier's multiplier); within a job the fastest renders set how many units a task is worth.
Invariants:

* only attempts with outcome ``done`` that are the current attempt of a task in state ``accepted`` count:
  failed, lost, canceled, voided or rejected attempts are never paid (fencing by (task, attempt));
* amounts are integers in the token's smallest unit, computed from integer milliseconds, so the same
  database always yields the same payout list (its hash is what the creator approves);
* payouts plus the operator fee never exceed the deposit: when the actual cost is higher than the
  deposit, the shares are scaled down to fit (the deposit is the creator's budget) and ``capped`` is set.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from sqlmodel import Session, select

from farm import constants as VC  # spot-check sizes: what a check re-renders
from farm.kinds import frames as splitter
from farm.store.models import Attempt, Check, Job, Task, Worker
from farm.store.states import CheckStatus, TaskStatus
from farm.verify import reputation as R  # tiers: whose timing is the reference

TOKEN_DECIMALS = 18
WEI = 10**TOKEN_DECIMALS
BPS = 10_000
HISTORY_TASKS = 200  # recent accepted tasks the seconds-per-frame guess looks at


def to_wei(tokens: str | int | float | Decimal) -> int:
    return int((Decimal(str(tokens)) * WEI).to_integral_value(ROUND_CEILING))


def tokens(wei: int | str) -> str:
    """A human amount of tokens: '12.5', '0.000001'."""
    d = Decimal(int(wei)) / WEI
    return format(d.normalize(), "f") if d else "0"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"RENDERHIVE_{name}") or default


@dataclass(frozen=True)
class Pricing:
    """Prices and escrow terms. Every field can be set through an environment variable."""
    price_per_unit: int = to_wei("0.01")  # wei per reference second (measured): RENDERHIVE_PRICE_PER_UNIT tokens
    deposit_margin: Decimal = Decimal("1.5")  # deposit = estimate × margin (+ fee): RENDERHIVE_DEPOSIT_MARGIN
    min_deposit: int = to_wei("1")  # RENDERHIVE_MIN_DEPOSIT tokens
    default_seconds_per_frame: float = 10.0  # with no render history: RENDERHIVE_DEFAULT_SECONDS_PER_FRAME
    fee_bps: int = 250  # operator fee in basis points of the payouts: RENDERHIVE_OPERATOR_FEE_BPS
    deadline_seconds: int = 7 * 24 * 3600  # refund possible after this: RENDERHIVE_ESCROW_DEADLINE
    demo_tokens: int = to_wei("1000")  # minted to each creator on a dev token: RENDERHIVE_DEMO_TOKENS

    @classmethod
    def from_env(cls) -> "Pricing":
        return cls(price_per_unit=to_wei(_env("PRICE_PER_UNIT", "0.01")),
                   deposit_margin=Decimal(_env("DEPOSIT_MARGIN", "1.5")),
                   min_deposit=to_wei(_env("MIN_DEPOSIT", "1")),
                   default_seconds_per_frame=float(_env("DEFAULT_SECONDS_PER_FRAME", "10")),
                   fee_bps=int(_env("OPERATOR_FEE_BPS", "250")),
                   deadline_seconds=int(float(_env("ESCROW_DEADLINE", str(7 * 24 * 3600)))),
                   demo_tokens=to_wei(_env("DEMO_TOKENS", "1000")))

    def cost(self, work_ms: int, rate: int | None = None) -> int:
        """Wei for ``work_ms`` milli-units at ``rate`` wei per unit (default: the fixed price)."""
        return work_ms * (self.price_per_unit if rate is None else rate) // 1000

    def fee(self, total: int) -> int:
        return total * self.fee_bps // BPS  # the escrow computes it the same way

    def budget(self, deposit: int) -> int:
        """The largest payout total whose fee still fits in ``deposit``."""
        return deposit * BPS // (BPS + self.fee_bps)


# ------------------------------------------------------------------ estimate
def seconds_per_unit(s: Session, pricing: Pricing, scene: str | None, settings: dict[str, Any] | None,
                     kind: str = "render", tiles: int = 1) -> tuple[float, str]:
    """A guess of render seconds per unit and how it was made: from earlier accepted tasks of the same
    scene and settings (tiled or not: :func:`farm.kinds.frames.same_settings`), else the farm's recent
    median, else a configured default. History is counted per frame (a tile task's seconds × its grid's
    tiles) and a unit is a frame, or with ``tiles`` > 1 one tile of that many a frame. (Once workers report
    a benchmark score, the unit becomes benchmark-normalised and this guess divides by the farm's score.)"""
    rows = s.exec(select(Task.render_seconds, Task.progress_total, Task.spec, Job.spec)
                  .join(Job, Job.id == Task.job_id)
                  .where(Task.status == TaskStatus.accepted.value).where(Task.kind == kind)
                  .where(Task.render_seconds > 0)
                  .order_by(Task.id.desc()).limit(HISTORY_TASKS)).all()
    same, any_ = [], []
    tiles = max(1, int(tiles))
    for secs, units, tspec, jspec in rows:
        task_settings = (tspec or {}).get("settings")
        per = secs / max(1, units or 1) * splitter.tiles_per_frame(task_settings)  # seconds a frame
        any_.append(per)
        if scene and jspec.get("scene_sha256") == scene and splitter.same_settings(task_settings, settings):
            same.append(per)
    if same:
        return statistics.median(same) / tiles, f"median of {len(same)} earlier tasks of this scene and settings"
    if any_:
        return statistics.median(any_) / tiles, f"median of the farm's last {len(any_)} accepted tasks"
    return pricing.default_seconds_per_frame / tiles, "default (no render history yet)"


def estimate(s: Session, pricing: Pricing, units: int, scene: str | None = None,
             settings: dict[str, Any] | None = None, rate: int | None = None) -> dict[str, Any]:
    """What ``units`` frames will probably cost at ``rate`` wei per unit (default: the fixed price), and the
    deposit taken at job start."""
    per, basis = seconds_per_unit(s, pricing, scene, settings)
    return _priced(pricing, units, per, basis, rate)


def _priced(pricing: Pricing, units: int, per: float, basis: str, rate: int | None = None) -> dict[str, Any]:
    rate = pricing.price_per_unit if rate is None else rate
    work_ms = int(round(units * per * 1000))
    cost = pricing.cost(work_ms, rate)
    deposit = max(pricing.min_deposit,
                  int((Decimal(cost) * pricing.deposit_margin).to_integral_value(ROUND_CEILING)))
    deposit += pricing.fee(deposit)
    return {"units": units, "seconds_per_unit": round(per, 4), "basis": basis,
            "work_seconds": work_ms / 1000, "price_per_unit": str(rate),
            "cost": str(cost), "deposit": str(deposit), "fee_bps": pricing.fee_bps,
            "cost_tokens": tokens(cost), "deposit_tokens": tokens(deposit),
            "price_per_unit_tokens": tokens(rate)}


priced = _priced  # the estimate at a given seconds per unit (farm.payments.quotes: a probed job's quote)


def request_settings(req: dict[str, Any]) -> dict[str, Any]:
    """The render settings a job request would be stored with (what history is matched on)."""
    return splitter.render_settings(req.get("format", "PNG"), req.get("color_depth"), req.get("samples"),
                                    req.get("resolution_percent"), req.get("resolution"), req.get("time_limit"),
                                    req.get("passes"))


def estimate_request(s: Session, pricing: Pricing, req: dict[str, Any], rate: int | None = None) -> dict[str, Any]:
    """The estimate of a job request (the body of POST /api/jobs), before it is submitted."""
    settings = request_settings(req)
    units = len(splitter.parse_frames(str(req.get("frames", ""))))
    return estimate(s, pricing, units, req.get("scene_sha256") or None, settings, rate)


def estimate_job(s: Session, pricing: Pricing, job: Job, rate: int | None = None) -> dict[str, Any]:
    """The estimate of a stored job, in units of its main kind of task (frames, tiles, images), at ``rate``;
    without one, a job quoted at submit gets its locked quote (farm.payments.quotes): the deposit it was
    told, however the farm's history or price moved since."""
    quote = job.spec.get("quote")
    if rate is None and quote:
        return {k: quote[k] for k in ("units", "seconds_per_unit", "basis", "cost", "deposit", "fee_bps",
                                      "cost_tokens", "deposit_tokens")} | {
            "price_per_unit": quote["rate"], "price_per_unit_tokens": tokens(quote["rate"])}
    mine = (Task.job_id == job.id) & Task.probe.is_(False)  # a probe render is not the job's work
    kind = s.exec(select(Task.kind).where(mine).order_by(Task.index)).first() or "render"
    units = sum(s.exec(select(Task.progress_total).where(mine).where(Task.kind == kind)).all())
    tiles = splitter.job_tiles(job.spec) if kind == "render" else 1
    per, basis = seconds_per_unit(s, pricing, job.spec.get("scene_sha256"), job.spec.get("settings"), kind, tiles)
    return _priced(pricing, units or job.tasks_total, per, basis, job_rate(pricing, job) if rate is None else rate)


def job_rate(pricing: Pricing, job: Job | None) -> int:
    """Wei per unit of measured work that ``job`` pays: the rate locked in its quote (the market price ×
    its tier's multipliers, farm.payments.quotes), else the fixed price."""
    quote = job.spec.get("quote") if job is not None else None
    return int(quote["rate"]) if quote else pricing.price_per_unit


# ------------------------------------------------------------------ actual cost and payouts
@dataclass
class Share:
    worker_id: str
    wallet: str  # checksummed address, or "" when the worker gave none (not payable)
    work_ms: int
    tasks: int
    amount: int = 0
    check_ms: int = 0  # spot checks it ran for the job (paid by the job, shown apart)
    checks: int = 0


def reference_work(s: Session, job_id: int) -> float:
    """Reference seconds one unit (frame, tile, image) of job ``job_id`` is worth (module docstring)."""
    rows = s.exec(select(Attempt.worker_id, Attempt.started_at, Attempt.ended_at, Task.progress_total)
                  .join(Task, (Task.id == Attempt.task_id) & (Task.attempt == Attempt.attempt))
                  .where(Attempt.job_id == job_id).where(Attempt.outcome == "done")
                  .where(Task.status == TaskStatus.accepted.value)).all()  # checks too: other workers' timing
    trusted, anyone = [], []
    tiers: dict[str, bool] = {}
    for worker_id, started, ended, units in rows:
        if ended is None or started is None or ended <= started:
            continue
        if worker_id not in tiers:
            w = s.get(Worker, worker_id)
            tiers[worker_id] = w is not None and R.at_least(w.tier, R.Tier.trusted)
        (trusted if tiers[worker_id] else anyone).append((ended - started) / max(1, units or 1))
    pool = sorted(trusted or anyone)
    if not pool:
        return 0.0
    fastest = pool[:max(1, len(pool) // 3)]
    return sum(fastest) / len(fastest)


def accepted_work(s: Session, job_id: int, ref: float | None = None) -> dict[str, tuple[int, int]]:
    """worker id → (measured work in milli-units, tasks) of the job's accepted tasks, by their accepting
    attempt: each task is worth its units × the job's reference work (:func:`reference_work`)."""
    ref = reference_work(s, job_id) if ref is None else ref
    rows = s.exec(select(Attempt.worker_id, Task.progress_total)
                  .join(Task, (Task.id == Attempt.task_id) & (Task.attempt == Attempt.attempt))
                  .where(Attempt.job_id == job_id).where(Attempt.outcome == "done")
                  .where(Task.check_id.is_(None))  # checks are counted apart (check_work)
                  .where(Task.status == TaskStatus.accepted.value)).all()
    work: dict[str, tuple[int, int]] = {}
    for worker_id, units in rows:
        ms, n = work.get(worker_id, (0, 0))
        work[worker_id] = (ms + int(round(max(1, units or 1) * ref * 1000)), n + 1)
    return work


CHECK_VERDICTS = (CheckStatus.passed.value, CheckStatus.failed.value)
"""Checks whose verifier is paid: those whose re-render decided the verdict. A check that ended disputed
(its verifier disagreed and a tiebreak followed) pays only the tiebreak's verifier; one left unverified or
canceled pays nobody."""


def check_fraction(mode: str) -> float:
    """How much of a unit a check of ``mode`` re-renders: crops are CHECK_CROPS × CHECK_CROP_FRACTION of the
    frame, the other modes the whole of it."""
    return min(1.0, VC.CHECK_CROPS * VC.CHECK_CROP_FRACTION) if mode == "crops" else 1.0


def check_work(s: Session, job_id: int, ref: float | None = None) -> dict[str, tuple[int, int]]:
    """worker id → (measured work in milli-units, checks) of the spot checks it ran for the job that decided a
    verdict: paid by the job, at its reference work per unit × the share of the unit a check re-renders
    (:func:`check_fraction`), like any other work: measured, not claimed."""
    ref = reference_work(s, job_id) if ref is None else ref
    rows = s.exec(select(Attempt.worker_id, Task.progress_total, Check.mode)
                  .join(Task, (Task.id == Attempt.task_id) & (Task.attempt == Attempt.attempt))
                  .join(Check, Check.id == Task.check_id)
                  .where(Attempt.job_id == job_id).where(Attempt.outcome == "done")
                  .where(Task.status == TaskStatus.accepted.value)
                  .where(Check.status.in_(CHECK_VERDICTS)).where(Check.verifier_id == Attempt.worker_id)).all()
    work: dict[str, tuple[int, int]] = {}
    for worker_id, units, mode in rows:
        ms, n = work.get(worker_id, (0, 0))
        work[worker_id] = (ms + int(round(max(1, units or 1) * ref * check_fraction(mode) * 1000)), n + 1)
    return work


def probe_work(s: Session, job_id: int, ref: float | None = None) -> dict[str, tuple[int, int]]:
    """worker id → (measured work in milli-units, 1) for the job's probe render (farm.kinds.probe), when its
    worker's RESULT was stored: paid by the job, at its reference work per unit × the units a frame holds ×
    the probe's fraction of a frame's pixels × samples — measured like a check, never claimed."""
    job = s.get(Job, job_id)
    probe = (job.spec.get("probe") or {}) if job is not None else {}
    if not probe.get("worker_id") or "seconds" not in probe:
        return {}
    done = s.exec(select(Attempt.id).where(Attempt.task_id == probe["task_id"])
                  .where(Attempt.attempt == probe.get("attempt")).where(Attempt.worker_id == probe["worker_id"])
                  .where(Attempt.outcome == "done")).first()
    if done is None:
        return {}
    ref = reference_work(s, job_id) if ref is None else ref
    units = max(1, int(probe.get("tiles") or 1)) * min(1.0, float(probe.get("fraction") or 1.0))
    return {probe["worker_id"]: (int(round(ref * units * 1000)), 1)}


def shares(s: Session, pricing: Pricing, job_id: int, deposit: int,
           checksum=lambda a: a or None) -> tuple[list[Share], bool]:
    """Each worker's share of the job — its accepted work plus the checks it ran for the job — scaled to fit
    the deposit when needed. Returns (shares, capped). ``checksum`` normalises a wallet address (None when
    it is not one)."""
    out = []
    rate = job_rate(pricing, s.get(Job, job_id))
    ref = reference_work(s, job_id)
    work, checks = accepted_work(s, job_id, ref), check_work(s, job_id, ref)
    for worker_id, (ms, n) in probe_work(s, job_id, ref).items():  # the probe is paid as a check is, shown with them
        cms, cn = checks.get(worker_id, (0, 0))
        checks[worker_id] = (cms + ms, cn + n)
    for worker_id in sorted(set(work) | set(checks)):
        (ms, n), (cms, cn) = work.get(worker_id, (0, 0)), checks.get(worker_id, (0, 0))
        w = s.get(Worker, worker_id)
        wallet = (checksum(w.wallet) if w and w.wallet else None) or ""
        out.append(Share(worker_id, wallet, ms, n, pricing.cost(ms + cms, rate), check_ms=cms, checks=cn))
    payable = sum(x.amount for x in out if x.wallet)
    budget = pricing.budget(deposit)
    capped = payable > budget
    if capped:
        for x in out:
            x.amount = x.amount * budget // payable
    return out, capped


def onchain_list(shares_: list[Share]) -> tuple[list[str], list[int]]:
    """The escrow's payout list: payable shares summed per wallet, sorted by address, no zero amounts."""
    by_wallet: dict[str, int] = {}
    for x in shares_:
        if x.wallet and x.amount > 0:
            by_wallet[x.wallet] = by_wallet.get(x.wallet, 0) + x.amount
    wallets = sorted(by_wallet, key=str.lower)
    return wallets, [by_wallet[w] for w in wallets]
