"""A day of the market on 1,000 simulated workers: the price path, utilisation, and how good the quoted ETA
and cost estimate were.

In process, discrete events, synthetic speeds: nothing renders, no database. What is real is the code that
decides: :class:`farm.payments.market.Market` (sampled every SAMPLE seconds of simulated time, as ``farm
serve`` does), :class:`farm.payments.quotes.TierTerms` and :func:`farm.payments.quotes.offer` (a creator
with a ``max_price`` below the rate is refused), and the ETA formula of :func:`farm.web.queue.queue_view`
(busy + the larger of one task and (tasks ahead + the job's tasks) × seconds a task ÷ slots; seconds a
task the median of the last 64 finished tasks), restated here over the simulation's queues.

The farm: 1,000 one-slot workers, speeds log-normal (σ 0.35) around 1 (a task of R reference seconds takes
R ÷ speed), 50 % new, 35 % trusted, 15 % top. The load: jobs arrive as a Poisson process whose rate follows
the day (a sine, peak at 15:00, trough at 03:00; mean about 0.75 of capacity, the peak above it); each job
10-200 frames in tasks of 4, its seconds a frame log-normal around 30 (σ 0.6), 75 % tier any, 20 %
trusted, 5 % top; 40 % of creators set ``--max-price`` (1.2-3 × the floor). The estimate a creator is
quoted uses the farm's median seconds a frame so far (pricing.seconds_per_unit without history for the
scene): its ratio to the actual cost shows what a probe render would have to fix. Side by side, the same
job's estimate after a probe render (:func:`farm.kinds.probe.per_unit`, the code the coordinator runs):
the probe renders 1/16 of a frame's pixels × samples (:func:`farm.kinds.probe.reduced` of 100 % and 64
samples) on a random worker, with a fixed part (runtime start, scene load: log-normal around 2 s, σ 0.5)
that is not scaled; the worker reports its render seconds honestly.

Run: ``.venv/bin/python bench/market.py [--hours 24] [--workers 1000] [--seed 1]``. It checks its own
results (every price within bounds, every accepted job done, utilisation ≤ 1) and exits non-zero if not.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.kinds import probe  # noqa: E402
from farm.payments import market as mk  # noqa: E402
from farm.payments import pricing as pr  # noqa: E402
from farm.payments import quotes  # noqa: E402

SAMPLE = 5.0  # seconds between two load samples (MarketTerms.sample_seconds)
CHUNK = 4  # frames a task
RECENT = 64  # finished tasks the seconds-a-task median looks at (farm.web.queue.SAMPLE)
GAP = 0.3  # seconds between a worker's tasks (READY round trip, inputs cached)
TIER_RANK = {"any": 0, "new": 0, "trusted": 1, "top": 2}
PROBE_FRACTION = probe.reduced({"resolution_percent": 100, "samples": 64})[1]  # 1/16


@dataclass
class Job:
    id: int
    submitted: float
    tier: str
    tasks: int
    ref: float  # reference seconds a frame
    frames: int
    eta: float
    estimate: int
    cost: int
    probed: int = 0  # the estimate after a probe render
    left: int = 0
    done_at: float | None = None


@dataclass(order=True)
class Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    data: tuple = field(compare=False, default=())


class Sim:
    def __init__(self, workers: int, hours: float, seed: int, fixed: bool = False):
        self.rng = random.Random(seed)
        self.probe_rng = random.Random(seed + 1)
        self.end = hours * 3600
        self.terms = mk.MarketTerms.from_env(pr.Pricing())
        if fixed:  # the baseline: the price before the market, fixed at the floor
            self.terms = mk.MarketTerms(self.terms.floor, self.terms.floor)
        self.market = mk.Market(self.terms, clock=lambda: self.now)
        self.tiers = quotes.TierTerms()
        self.now = 0.0
        self.seq = 0
        self.events: list[Event] = []
        self.speed = [self.rng.lognormvariate(0, 0.35) for _ in range(workers)]
        self.wtier = ["top" if (u := self.rng.random()) < 0.15 else "trusted" if u < 0.5 else "new" for _ in self.speed]
        self.free: dict[str, list[int]] = {t: [] for t in ("new", "trusted", "top")}
        for w, t in enumerate(self.wtier):
            self.free[t].append(w)
        self.queues: dict[str, deque] = {t: deque() for t in ("any", "trusted", "top")}
        self.queued_work = 0.0  # reference seconds waiting
        self.running_work = 0.0  # reference seconds being rendered
        self.running = 0
        self.busy_seconds = 0.0
        self.recent: deque = deque(maxlen=RECENT)  # seconds of finished tasks (lease to result)
        self.frame_history: deque = deque(maxlen=200)  # reference seconds a frame of finished tasks
        self.jobs: list[Job] = []
        self.refused = 0
        self.path: list[tuple[float, float, int]] = []  # (time, smoothed load, price)
        self.capacity = sum(self.speed) / len(self.speed) * workers  # reference seconds a second
        self.mean_job = 105 * 30 * math.exp(0.6 ** 2 / 2)  # frames × seconds a frame (log-normal mean)

    def push(self, at: float, kind: str, *data) -> None:
        self.seq += 1
        heapq.heappush(self.events, Event(at, self.seq, kind, data))

    def rate(self, t: float) -> float:
        """Jobs a second at time t: mean 0.75 of capacity, ±60 % over the day, peak at 15:00."""
        day = 1 + 0.6 * math.sin(2 * math.pi * (t / 86400 - 9 / 24))
        return 0.75 * self.capacity / self.mean_job * day

    def run(self) -> None:
        peak = self.rate(15 * 3600)
        self.push(self.rng.expovariate(peak), "arrive")
        self.push(0.0, "sample")
        while self.events:
            ev = heapq.heappop(self.events)
            if ev.at > self.end and ev.kind != "done":
                continue
            self.now = ev.at
            if ev.kind == "arrive":  # thinning: a Poisson process with the day's rate
                if self.rng.random() < self.rate(self.now) / peak:
                    self.submit()
                self.push(self.now + self.rng.expovariate(peak), "arrive")
            elif ev.kind == "sample":
                self.market.observe(self.queued_work + self.running_work, len(self.speed), self.now)
                self.path.append((self.now, self.market.load(), mk.price_at(self.market.load(), self.terms)))
                self.push(self.now + SAMPLE, "sample")
            else:
                self.finish(*ev.data)
            self.dispatch()

    def submit(self) -> None:
        u = self.rng.random()
        tier = "top" if u < 0.05 else "trusted" if u < 0.25 else "any"
        limit = str(round(self.rng.uniform(1.2, 3.0) * 0.01, 4)) if self.rng.random() < 0.4 else None
        try:
            offer = quotes.offer(self.market, self.tiers, {"tier": tier, "max_price": limit})
        except quotes.QuoteRefused:
            self.refused += 1
            return
        frames = self.rng.randint(10, 200)
        ref = self.rng.lognormvariate(math.log(30), 0.6)
        tasks = math.ceil(frames / CHUNK)
        per_frame = statistics.median(self.frame_history) if self.frame_history else 10.0
        job = Job(len(self.jobs), self.now, tier, tasks, ref, frames, self.eta(tasks),
                  pr.Pricing().cost(int(frames * per_frame * 1000), offer.rate),
                  pr.Pricing().cost(int(frames * ref * 1000), offer.rate), left=tasks)
        # the probe render on a random worker (its own generator: the day's draws stay those of the fixed run)
        render = ref * PROBE_FRACTION / self.speed[self.probe_rng.randrange(len(self.speed))]
        fixed = self.probe_rng.lognormvariate(math.log(2.0), 0.5)
        unit, _ = probe.per_unit({"fraction": PROBE_FRACTION, "tiles": 1}, fixed + render, render)
        job.probed = pr.Pricing().cost(int(frames * unit * 1000), offer.rate)
        self.jobs.append(job)
        for i in range(tasks):
            units = min(CHUNK, frames - i * CHUNK)
            self.queues[tier].append((job.id, units))
            self.queued_work += units * ref

    def eta(self, tasks: int) -> float:
        """farm.web.queue's ETA: every online worker counts as able (it does not filter by tier)."""
        per = (statistics.median(self.recent) if self.recent else 10.0) + GAP
        slots = len(self.speed)
        ahead = sum(len(q) for q in self.queues.values())
        busy = min(self.running, slots) * per / 2 / slots
        return busy + max(per, (ahead + tasks) * per / slots)

    def dispatch(self) -> None:
        # the highest tiers' queues first, each from the lowest tier of worker allowed to take it
        for tier, pools in (("top", ("top",)), ("trusted", ("trusted", "top")), ("any", ("new", "trusted", "top"))):
            q = self.queues[tier]
            for pool in pools:
                free = self.free[pool]
                while q and free:
                    w = free.pop(self.rng.randrange(len(free)))
                    job_id, units = q.popleft()
                    work = units * self.jobs[job_id].ref
                    self.queued_work -= work
                    self.running_work += work
                    self.running += 1
                    secs = work / self.speed[w]
                    self.push(self.now + secs + GAP, "done", w, job_id, units, secs)

    def finish(self, w: int, job_id: int, units: int, secs: float) -> None:
        job = self.jobs[job_id]
        self.running_work -= units * job.ref
        self.running -= 1
        self.busy_seconds += max(0.0, min(self.now, self.end) - (self.now - secs - GAP))  # within the day
        self.recent.append(secs)
        self.frame_history.append(job.ref)
        self.free[self.wtier[w]].append(w)
        job.left -= 1
        if job.left == 0:
            job.done_at = self.now


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    started = time.perf_counter()
    base = Sim(args.workers, args.hours, args.seed, fixed=True)
    base.run()
    sim = Sim(args.workers, args.hours, args.seed)
    sim.run()
    wall = time.perf_counter() - started
    t = sim.terms
    prices = [p for _, _, p in sim.path]
    done = [j for j in sim.jobs if j.done_at is not None]
    errors = [abs(j.eta - (j.done_at - j.submitted)) / (j.done_at - j.submitted) for j in done]
    signed = [(j.eta - (j.done_at - j.submitted)) / (j.done_at - j.submitted) for j in done]
    est = [j.estimate / j.cost for j in done if j.cost]
    probed = [j.probed / j.cost for j in done if j.cost]
    util = sim.busy_seconds / (args.workers * sim.end)
    print(f"market bench: {args.workers} workers, {args.hours:g} h simulated twice in {wall:.1f} s; price floor "
          f"{pr.tokens(t.floor)}, ceiling {pr.tokens(t.ceiling)} tokens a unit, half-life {t.half_life:g} s, "
          f"horizon {t.horizon:g} s")
    print(" hour  load   price   (tokens per reference second, at the hour)")
    for h in range(int(args.hours)):
        at = [x for x in sim.path if h * 3600 <= x[0] < (h + 1) * 3600]
        if at:
            _, load, price = at[-1]
            print(f"  {h:>2}  {load:5.2f}  {pr.tokens(price):<7} {'#' * int(40 * (price - t.floor) / (t.ceiling - t.floor))}")
    print(f"price: min {pr.tokens(min(prices))}, median {pr.tokens(int(statistics.median(prices)))}, max "
          f"{pr.tokens(max(prices))}; largest move in one sample {pr.tokens(max(abs(a - b) for a, b in zip(prices, prices[1:])))}")
    print(f"jobs: {len(sim.jobs)} accepted, {sim.refused} refused by their --max-price "
          f"({sim.refused / max(1, sim.refused + len(sim.jobs)):.1%}); {len(done)} done")
    print(f"utilisation: {util:.1%} of {args.workers} workers' time")
    print(f"ETA error |eta - actual| / actual: median {statistics.median(errors):.1%}, p90 {pct(errors, 0.9):.1%} "
          f"(signed median {statistics.median(signed):+.1%}: + the quote was too long, - too short)")
    print(f"estimate ÷ actual cost (no probe render; the farm's median seconds a frame): median "
          f"{statistics.median(est):.2f}, p10 {pct(est, 0.1):.2f}, p90 {pct(est, 0.9):.2f}")
    print(f"estimate ÷ actual cost after a probe render (1/{1 / PROBE_FRACTION:.0f} of a frame's pixels × samples): "
          f"median {statistics.median(probed):.2f}, p10 {pct(probed, 0.1):.2f}, p90 {pct(probed, 0.9):.2f}")
    print("\nagainst the fixed price (the floor all day; same seed and arrival process):")
    print(f"  {'':<28} {'fixed':>10} {'market':>10} {'ratio':>7}")
    for name, f in (("jobs accepted", lambda s: len(s.jobs)), ("utilisation", lambda s: s.busy_seconds / (args.workers * s.end)),
                    ("median wait to done, s", lambda s: statistics.median(j.done_at - j.submitted for j in s.jobs)),
                    ("p90 wait to done, s", lambda s: pct([j.done_at - j.submitted for j in s.jobs], 0.9)),
                    ("revenue, tokens", lambda s: sum(j.cost for j in s.jobs) / pr.WEI)):
        a, b = f(base), f(sim)
        print(f"  {name:<28} {a:>10.4g} {b:>10.4g} {b / a if a else float('nan'):>7.3f}")
    ok = (all(t.floor <= p <= t.ceiling for p in prices) and len(done) == len(sim.jobs) and 0 < util <= 1
          and max(prices) > min(prices))
    if not ok:
        print("FAILED: a price out of bounds, a job not done, or utilisation out of (0, 1]", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
