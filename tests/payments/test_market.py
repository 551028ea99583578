"""The market: a price set by the farm's load within the operator's bounds, quotes locked at submit, tiers.

Real parts: an in-process coordinator driven through ``step`` (tests/payments/test_ledger.py's ``Farm``), a
real SQLite file, the embedded EVM settling the jobs, and the HTTP API through FastAPI's TestClient. The
market reads the load from the farm's database on the coordinator's clock.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from common import protocol as P
from farm.payments import market as mk
from farm.payments import pricing as pr
from farm.payments import quotes
from farm.store.db import session as new_session
from farm.store.ledger_models import Payout
from farm.store.models import Job, Output, Worker
from farm.verify import reputation as R
from farm.web.app import create_app
from tests.fixtures_inproc import make_job, put_scene, rows
from tests.payments.test_ledger import Farm, wallet_of

FLOOR, CEILING = pr.to_wei("0.01"), pr.to_wei("0.05")
TERMS = mk.MarketTerms(FLOOR, CEILING, half_life=60.0, horizon=60.0, knee=1.0, sample_seconds=5.0)


def farm_market(f: Farm) -> mk.Market:
    return mk.Market(TERMS, mk.farm_load(f.engine, f.pricing), clock=lambda: f.d.now)


def beat(f: Farm, dt: float) -> None:
    """``dt`` seconds pass; every connected worker heart-beats (it stays online: its slots are capacity)."""
    f.d.send(*[(i, P.Heartbeat([])) for i in f.d.coord.conns], dt=dt)


def point(f: Farm, m: mk.Market) -> tuple[float, float, int]:
    price = m.price()  # samples the load first when it is stale
    return f.d.now, m.load(), price


def test_the_price_function_is_bounded_and_monotone_in_load():
    loads = [0, 1e-6, 0.01, 0.1, 0.5, 1, 2, 5, 10, 100, 1e6, float("inf")]
    prices = [mk.price_at(x, TERMS) for x in loads]
    assert prices[0] == FLOOR and CEILING - (CEILING - FLOOR) // 100 < prices[-1] <= CEILING
    assert all(FLOOR <= p <= CEILING for p in prices)
    assert prices == sorted(prices) and len(set(prices)) > 6
    assert mk.price_at(1.0, TERMS) == FLOOR + (CEILING - FLOOR) // 2, "half-way at the knee"


def test_the_smoothed_load_moves_by_its_half_life_not_per_second():
    m = mk.Market(TERMS, clock=lambda: 0.0)
    m.observe(0, 4, now=0.0)
    m.observe(4 * 60 * 3, 4, now=1.0)  # the queue jumps to load 3
    assert m.load() == pytest.approx(3 * (1 - 2 ** (-1 / 60)))
    assert m.price(now=1.0) < FLOOR + (CEILING - FLOOR) // 20, "one second of a burst barely moves it"
    gap = 3 - m.load()
    m.observe(4 * 60 * 3, 4, now=61.0)
    assert 3 - m.load() == pytest.approx(gap / 2), "one half-life later the gap to the new load has halved"


def test_a_simulated_farm_moves_the_price_with_its_load_within_bounds(tmp_path):
    """Jobs pile up on four workers (load rising), then are rendered (load falling): the price follows,
    stays within [floor, ceiling], and is a non-decreasing function of the smoothed load."""
    f = Farm(tmp_path / "farm")
    m = farm_market(f)
    for ident in (b"w1", b"w2"):
        f.connect(ident)  # 8 slots each: 16 slots online
    path = [point(f, m)]
    assert path[0][2] == FLOOR, "an idle farm is at the floor"
    for _ in range(6):  # rising: a 40-frame job a minute (10 s a frame with no history)
        make_job(f.engine, f.blobs, f.alice, frames="1-40")
        for _ in range(6):
            beat(f, 10.0)
            path.append(point(f, m))
    peak = max(p for _, _, p in path)
    for _ in range(30):  # falling: the workers render it all, then the queue stays empty
        for ident in (b"w1", b"w2"):
            f.render(ident, 4, 2.5)
        path.append(point(f, m))
    for _ in range(20):
        beat(f, 30.0)
        path.append(point(f, m))
    prices = [p for _, _, p in path]
    assert all(FLOOR <= p <= CEILING for p in prices)
    assert FLOOR + (CEILING - FLOOR) // 4 < peak < CEILING, prices
    assert prices[-1] < FLOOR + (CEILING - FLOOR) // 50, "back near the floor once the queue is gone"
    by_load = sorted((load, p) for _, load, p in path)
    assert [p for _, p in by_load] == sorted(p for _, p in by_load), "monotone in load"
    rising = prices[:prices.index(peak) + 1]
    assert rising == sorted(rising), "it rose while work was queued faster than it was rendered"


def _api(f: Farm, m: mk.Market):
    http = TestClient(create_app(f.engine, f.blobs, broker=None, ledger=f.ledger, market=m))
    return http, {"Authorization": f"Bearer {f.alice_token}"}


def test_a_locked_quote_is_honoured_after_the_price_moves(tmp_path):
    f = Farm(tmp_path / "farm")
    m = farm_market(f)
    http, alice = _api(f, m)
    scene = put_scene(f.blobs)
    f.connect(b"w1")
    r = http.post("/api/jobs", json={"scene_sha256": scene, "frames": "1-4"}, headers=alice)
    assert r.status_code == 201, r.text
    first = r.json()["id"]
    quote = r.json()["spec"]["quote"]
    assert quote["price_per_unit"] == str(FLOOR) == quote["rate"] and quote["tier"] == "any"
    assert quote["eta_seconds"] is not None and int(quote["deposit"]) >= int(quote["cost"])
    # the market moves: a big job is queued and the load is sampled for a few minutes
    make_job(f.engine, f.blobs, f.alice, frames="1-400", priority=-1)  # leased after the first job
    for _ in range(20):
        beat(f, 10.0)
        m.price()
    now = m.price()
    assert now > 2 * FLOOR, "the price rose"
    second = http.post("/api/jobs", json={"scene_sha256": put_scene(f.blobs, b"2"), "frames": "1-4"},
                       headers=alice).json()
    assert second["spec"]["quote"]["rate"] == str(now), "a new job is quoted the new price"
    # max_price below the rate now: refused with the price and what to do, nothing written
    jobs_before = len(rows(f.engine, Job))
    r = http.post("/api/jobs", json={"scene_sha256": scene, "frames": "1", "max_price": "0.011"}, headers=alice)
    assert r.status_code == 409 and pr.tokens(now) in r.json()["detail"] and "--max-price" in r.json()["detail"]
    assert len(rows(f.engine, Job)) == jobs_before
    # the first job is settled at its locked rate
    f.settle()
    assert f.st(first).deposit == quote["deposit"] and f.st(first).estimate == quote["cost"]
    f.render(b"w1", 4, 2.0)
    assert f.job(first).status == "rendered"
    f.settle()
    assert http.post(f"/api/jobs/{first}/approve", headers=alice).status_code == 200
    f.settle()
    assert f.job(first).status == "paid"
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(4 * 2000, FLOOR) < f.pricing.cost(4 * 2000, now)
    payouts = http.get(f"/api/jobs/{first}/payouts", headers=alice).json()
    assert payouts["price_per_unit_tokens"] == pr.tokens(FLOOR)


def test_a_trusted_tier_job_never_runs_on_a_new_worker_and_pays_the_multiplier(tmp_path):
    f = Farm(tmp_path / "farm")
    m = farm_market(f)
    http, alice = _api(f, m)
    with new_session(f.engine) as s:
        for wid in ("old", "fresh"):
            w = Worker(id=wid)
            s.add(w)
            if wid == "old":
                for _ in range(5):
                    R.record(s, w, "check_passed", f.d.now)
        s.commit()
        assert s.get(Worker, "old").tier == "trusted" and s.get(Worker, "fresh").tier == "new"
    f.connect(b"fresh")
    f.connect(b"old")
    est = http.post("/api/estimate", json={"frames": "1-4", "tier": "trusted"}, headers=alice).json()
    tier_rate = FLOOR * 15 // 10
    assert est["quote"]["tier"] == "trusted" and est["quote"]["multiplier"] == "1.5"
    assert est["quote"]["rate"] == str(tier_rate) and est["tiers"] == {"any": "1", "trusted": "1.5", "top": "2",
                                                                        "priority": "1.25"}
    r = http.post("/api/jobs", json={"scene_sha256": put_scene(f.blobs), "frames": "1-4", "tier": "trusted"},
                  headers=alice)
    assert r.status_code == 201, r.text
    job_id, spec = r.json()["id"], r.json()["spec"]
    assert spec["min_tier"] == "trusted" and spec["quote"]["rate"] == str(tier_rate)
    f.settle()
    assert f.render(b"fresh", 4, 1.0) == [], "the new worker is offered none of it"
    assert len(f.render(b"old", 4, 1.0)) == 4
    assert {o.worker_id for o in rows(f.engine, Output, Output.job_id == job_id)} == {"old"}
    f.settle()
    assert http.post(f"/api/jobs/{job_id}/approve", headers=alice).status_code == 200
    f.settle()
    with new_session(f.engine) as s:
        (p,) = s.exec(select(Payout).where(Payout.job_id == job_id)).all()
    assert p.worker_id == "old" and int(p.amount) == f.pricing.cost(4000, tier_rate) == 3 * f.pricing.cost(4000) // 2
    assert f.chain.credit(wallet_of("old")) == int(p.amount)


def test_tiers_and_priority_multiply_the_rate_and_bad_requests_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_TIER_MULTIPLIERS", "trusted=1.2,top=3")
    tiers = quotes.TierTerms.from_env()
    m = mk.Market(TERMS)
    assert quotes.offer(m, tiers, {"tier": "top"}).rate == 3 * FLOOR
    assert quotes.offer(m, tiers, {"min_tier": "trusted"}).rate == FLOOR * 12 // 10
    assert quotes.offer(m, tiers, {"priority": 5}).rate == FLOOR * 125 // 100
    assert quotes.offer(m, tiers, {"priority": -5}).rate == FLOOR
    with pytest.raises(quotes.QuoteRefused, match="max_price must be a positive number"):
        quotes.offer(m, tiers, {"max_price": "cheap"})
    with pytest.raises(quotes.QuoteRefused, match="above your max_price"):
        quotes.offer(m, tiers, {"tier": "top", "max_price": "0.02"})
    monkeypatch.setenv("RENDERHIVE_TIER_MULTIPLIERS", "gold=9")
    with pytest.raises(ValueError, match="name only any, trusted, top"):
        quotes.TierTerms.from_env()
    with pytest.raises(ValueError, match="RENDERHIVE_PRICE_FLOOR <= RENDERHIVE_PRICE_CEILING"):
        mk.MarketTerms(floor=CEILING, ceiling=FLOOR)
