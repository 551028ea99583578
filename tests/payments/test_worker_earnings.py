"""What workers hear of money, through the core's earnings port (farm.payments.earnings) and a real
``Coordinator.step``: PRICE after every WELCOME, EARNED once a share is credited (not while the list is only
posted), and after a later HELLO for recent jobs; the Workers page shows the same current price."""
from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlmodel import select

from common import protocol as P
from farm.core.coordinator import Coordinator
from farm.core.scheduler import Scheduler
from farm.payments import earnings, pricing
from farm.store.db import session as new_session
from farm.store.ledger_models import Payout, Settlement
from farm.web.app import create_app
from tests.fixtures_inproc import Driver, make_engine_and_store, make_job, make_user, of


def test_price_after_welcome_and_each_credited_share_once(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    job = make_job(engine, blobs, user, "1-2")
    price = pricing.Pricing(price_per_unit=pricing.to_wei("0.02"))
    coord = Coordinator(engine, blobs, Scheduler(seed=0), verify=False,
                        earnings=earnings.WorkerEarnings(price))
    d = Driver(coord)
    out = d.hello(b"w1")
    assert [type(m) for i, m in out if i == b"w1"][:2] == [P.Welcome, P.Price]
    assert of(out, P.Price)[0] == P.Price("0.02", "reference second of measured work", "")
    with new_session(engine) as s:  # the payout list is posted: not earned yet
        s.add(Settlement(job_id=job, escrow_job="1", status="posted", payout_round=1, round=1))
        s.add(Payout(job_id=job, round=1, worker_id="w1", wallet="0xw1", work_ms=1500, tasks=2, check_ms=500,
                     checks=1, amount=str(pricing.to_wei("0.04")), status="computed"))
        s.add(Payout(job_id=job, round=1, worker_id="w2", wallet="0xw2", work_ms=1000, tasks=1,
                     amount=str(pricing.to_wei("0.02")), status="computed"))
        s.commit()
    assert not of(d.send((b"w1", P.Heartbeat([])), dt=2), P.Earned)
    with new_session(engine) as s:  # the creator approved: the ledger credits the round
        s.get(Settlement, job).status = "approved"
        for p in s.exec(select(Payout)):
            p.status = "credited"
        s.commit()
    got = of(d.send((b"w1", P.Heartbeat([])), dt=2), P.Earned)
    assert got == [P.Earned(job, str(pricing.to_wei("0.04")), "0.04", 1.5, 2, 0.5, 1, "0.02")], \
        "to w1 only (w2 is not connected), at the rate it was paid"
    assert not of(d.send((b"w1", P.Heartbeat([])), dt=2), P.Earned), "announced once"
    out = d.hello(b"w2")  # a worker that was away hears of it after its HELLO
    assert [(i, m.job_id, m.tokens) for i, m in out if isinstance(m, P.Earned)] == [(b"w2", job, "0.02")]


def test_the_workers_page_shows_the_current_price(tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_PRICE_PER_UNIT", "0.025")
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    _, token = make_user(engine, "alice")
    with TestClient(create_app(engine, blobs)) as http:
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text).group(1)
        assert http.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False).status_code == 303
        page = http.get("/workers").text
    text = re.sub(r"<[^>]+>", "", re.search(r'<p class="price".*?</p>', page, re.S).group(0))
    assert text == ("Current price: 0.025 tokens per reference second of measured work — payments are off on "
                    "this farm: no job pays.")


def test_a_moved_price_is_sent_to_connected_workers_past_a_step_and_at_most_every_n_seconds(tmp_path, monkeypatch):
    """PRICE after WELCOME, then again to every connected worker when the market moved by more than
    PRICE_STEP (2 %) of the price last told, at most every PRICE_EVERY seconds: `farm worker` shows the live
    price. The market here is a real one fed load samples (a source would read the farm's queue)."""
    from farm.payments.market import Market, MarketTerms
    monkeypatch.setattr(earnings, "PRICE_EVERY", 30.0)
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    market = Market(MarketTerms(half_life=1.0, sample_seconds=0), None, clock=lambda: 0.0)
    coord = Coordinator(engine, blobs, Scheduler(seed=0), verify=False,
                        earnings=earnings.WorkerEarnings(pricing.Pricing(), market=market))
    d = Driver(coord)
    assert of(d.hello(b"w1"), P.Price)[0].tokens_per_unit == "0.01", "an idle farm: the floor"
    d.hello(b"w2")

    def prices(dt):
        out = d.send((b"w1", P.Heartbeat([])), (b"w2", P.Heartbeat([])), dt=dt)
        return sorted((i, m.tokens_per_unit) for i, m in out if isinstance(m, P.Price))

    market.observe(3, 1, now=1.0)  # load 0.005: 0.01012, a 1.2 % move
    assert prices(1) == [], "a move within the step is not sent"
    market.observe(600, 1, now=100.0)  # load ≈ 1: half-way up the band
    assert prices(1) == [(b"w1", "0.025"), (b"w2", "0.025")]
    market.observe(6000, 1, now=200.0)  # load ≈ 10
    assert prices(5) == [], "at most every PRICE_EVERY seconds"
    got = prices(30)
    assert [i for i, _ in got] == [b"w1", b"w2"] and float(got[0][1]) > 0.035, got
    assert prices(31) == [], "a price that stayed is not sent again"
