"""Worker reputation: one Bayesian score per worker from everything the farm has seen it do.

A worker's reputation is the mean of a Beta(1 + good, 1 + bad) distribution, where ``good`` and ``bad``
are sums of evidence (:data:`farm.constants.REP_WEIGHTS`: a passed spot check is 1 good, a failed one 10
bad, a crash a quarter bad) that decay with a half-life of REP_HALF_LIFE, so recent behaviour weighs
more. A fresh worker scores 0.5. The tier follows from the score and the amount of good evidence:

* ``probation``: score below REP_FLOOR. No work, only probes, until passed probes lift it;
* ``new``: not enough verified results yet (every result is checked);
* ``trusted`` / ``top``: score and verified results over TIER_TRUSTED / TIER_TOP.

Every change is stored on the Worker row and as a :class:`~farm.store.models.ReputationEvent` (the history),
in the caller's session, so it commits with the state change that caused it.

Speed is in work units a second: the benchmark score the worker claims in HELLO until the coordinator
has measured it (a full-frame check gives the same frame's render seconds on two workers), then the
measured one. A claim more than SPEED_OVERCLAIM times the measured speed is itself bad evidence.
"""
from __future__ import annotations

import enum
import math
from typing import Any

from farm import constants as C
from farm.store.models import ReputationEvent, Worker


class Tier(str, enum.Enum):
    """A worker's standing, worst to best (``Worker.tier`` holds the value). A job may ask for a minimum."""
    probation = "probation"  # below REP_FLOOR: no work, only probes, until passed probes lift it
    new = "new"              # every result checked
    trusted = "trusted"      # TIER_TRUSTED: a sample of results checked (CHECK_RATE)
    top = "top"              # TIER_TOP: fewer still


TIER_RANK = {t.value: i for i, t in enumerate(Tier)}
MIN_SPEED_SAMPLES = 3  # measurements before the measured speed replaces the claimed one


def score(good: float, bad: float) -> float:
    return (1.0 + good) / (2.0 + good + bad)


def tier_of(rep: float, good: float) -> Tier:
    if rep < C.REP_FLOOR:
        return Tier.probation
    if rep >= C.TIER_TOP[0] and good >= C.TIER_TOP[1]:
        return Tier.top
    if rep >= C.TIER_TRUSTED[0] and good >= C.TIER_TRUSTED[1]:
        return Tier.trusted
    return Tier.new


def at_least(tier: str, minimum: str | None) -> bool:
    return not minimum or TIER_RANK.get(tier, 0) >= TIER_RANK.get(minimum, 0)


def _decay(w: Worker, now: float) -> None:
    if w.rep_at and now > w.rep_at:
        f = math.pow(0.5, (now - w.rep_at) / C.REP_HALF_LIFE)
        w.rep_good, w.rep_bad = w.rep_good * f, w.rep_bad * f
    w.rep_at = max(now, w.rep_at or 0.0)


def record(s, w: Worker, kind: str, now: float, job_id: int | None = None, task_id: int | None = None,
           detail: str = "") -> tuple[str, str]:
    """Add one piece of evidence of ``kind`` to ``w`` (decaying the old first); returns (old, new) tier."""
    good, bad = C.REP_WEIGHTS[kind]
    old_tier = w.tier
    _decay(w, now)
    w.rep_good += good
    w.rep_bad += bad
    if kind in ("check_passed", "probe_passed"):
        w.checks_passed += 1
    elif kind in ("check_failed", "probe_failed"):
        w.checks_failed += 1
    w.reputation = round(score(w.rep_good, w.rep_bad), 6)
    w.tier = tier_of(w.reputation, w.rep_good).value
    s.add(w)
    s.add(ReputationEvent(at=now, worker_id=w.id, kind=kind, good=good, bad=bad, score=w.reputation,
                          tier=w.tier, job_id=job_id, task_id=task_id, detail=detail[:500]))
    return old_tier, w.tier


def claimed_speed(w: Worker, runtime: str = "blender") -> float | None:
    v = (w.benchmark or {}).get(runtime)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e12 else None


def speed(w: Worker, runtime: str = "blender") -> float | None:
    """Work units a second: measured once known, else claimed; None when neither is known."""
    if runtime == "blender" and w.speed_samples >= MIN_SPEED_SAMPLES and w.speed_measured > 0:
        return w.speed_measured
    return claimed_speed(w, runtime)


def measure(s, w: Worker, units: float, seconds: float, now: float, job_id: int | None = None,
            task_id: int | None = None) -> float | None:
    """A render of ``units`` work units took ``w`` ``seconds``: update its measured speed. Flags an
    overclaimed benchmark once the measurement has settled. Returns the new measured speed."""
    if units <= 0 or seconds <= 0:
        return None
    observed = units / seconds
    w.speed_measured = observed if w.speed_samples == 0 else \
        (1 - C.SPEED_EWMA) * w.speed_measured + C.SPEED_EWMA * observed
    w.speed_samples += 1
    s.add(w)
    claim = claimed_speed(w)
    if (claim and w.speed_samples == MIN_SPEED_SAMPLES
            and claim > C.SPEED_OVERCLAIM * w.speed_measured):
        record(s, w, "overclaimed", now, job_id, task_id,
               f"benchmark claims {claim:.1f} work units/s, measured {w.speed_measured:.1f}")
    return w.speed_measured


def yardstick(w: Worker) -> float | None:
    """The speed of a reference worker, conservatively: the lower of its claim and its measurement (a
    boaster used as a reference before it is measured would make everyone it is compared with look fast)."""
    known = [v for v in (claimed_speed(w), w.speed_measured if w.speed_samples else None) if v]
    return min(known) if known else None


def measure_job(s, job_id: int, now: float) -> list[Worker]:
    """Measure the speed of each worker that rendered frames of a finished job against the others: a
    frame costs about the same in one job, so the trusted workers' seconds a frame × their speed give its
    work units, and a worker's own seconds for its frames give its speed. Tiles are left out (their cost
    varies across the frame). Returns the workers measured."""
    from sqlmodel import select

    from farm.store.models import Output, Task
    rows = s.exec(select(Output.worker_id, Output.render_seconds, Task.spec)
                  .join(Task, (Task.id == Output.task_id) & (Task.attempt == Output.attempt))
                  .where(Output.job_id == job_id).where(Task.kind == "render")).all()
    per: dict[str, list[float]] = {}
    for worker_id, seconds, spec in rows:
        if seconds > 0 and not (spec.get("settings") or {}).get("tile"):
            per.setdefault(worker_id, []).append(seconds)
    workers = {wid: s.get(Worker, wid) for wid in per}
    units = {wid: sum(v) / len(v) * y for wid, v in per.items() if (w := workers[wid]) is not None
             and at_least(w.tier, Tier.trusted) and (y := yardstick(w))}  # work units a frame, by trusted workers
    measured = []
    for wid, secs in per.items():
        refs = sorted(u for other, u in units.items() if other != wid)
        w = workers[wid]
        if refs and w is not None:
            measure(s, w, refs[len(refs) // 2] * len(secs), sum(secs), now, job_id)
            measured.append(w)
    return measured


def view(w: Worker) -> dict[str, Any]:
    """The reputation fields of a worker for the API."""
    return {"reputation": round(w.reputation, 4), "tier": w.tier, "checks_passed": w.checks_passed,
            "checks_failed": w.checks_failed, "speed": speed(w), "speed_claimed": claimed_speed(w),
            "speed_measured": w.speed_measured if w.speed_samples else None, "work_units": round(w.work_units, 3),
            "vouched": w.vouched, "evidence": {"good": round(w.rep_good, 3), "bad": round(w.rep_bad, 3)}}
