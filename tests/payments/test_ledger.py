"""The ledger in process: a real coordinator (driven through ``step``), a real SQLite file, a real EVM —
eth-tester in process, and anvil as a real node process for the outage and restart cases.

Covers: deposit at start, payout list by accepted work, approval → paid with each worker credited exactly
its share, double approval, reject → re-render → approve, cancel → release, refund after the deadline,
workers without a wallet, costs above the deposit, a crash between "tx sent" and "receipt" (and between
"signed" and "sent"), a chain that is down, a chain that was reset, and the HTTP routes.
"""
from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from common import protocol as P
from farm.kinds import jobs
from farm.payments import chain as ch
from farm.payments import pricing as pr
from farm.payments.ledger import Ledger
from farm.store.db import session as new_session
from farm.store.ledger_models import ChainEvent, ChainTx, Payout, Settlement
from farm.store.models import Attempt, Event, Job
from farm.web import review
from farm.web.app import create_app
from tests.anvil import anvil  # noqa: F401  (fixture)
from tests.fixtures_inproc import (
    Driver,
    get,
    make_engine_and_store,
    make_job,
    make_user,
    new_coordinator,
    of,
    output_blob,
    rows,
)


def wallet_of(name: str) -> str:
    return ch.checksum("0x" + hashlib.sha256(name.encode()).hexdigest()[:40])


class Crash(Exception):
    """Stands for the coordinator process dying at a seam."""


class Farm:
    """An in-process farm: coordinator driven message by message, and a ledger on a chain."""

    def __init__(self, root, factory=ch.Chain.embedded_evm, pricing: pr.Pricing | None = None,
                 url: str | None = None):
        self.root = root
        self.engine, self.blobs = make_engine_and_store(root, url=url)
        self.alice, self.alice_token = make_user(self.engine, "alice")
        self.pricing = pricing or pr.Pricing(price_per_unit=pr.to_wei("0.01"), fee_bps=250)
        self.d = Driver(new_coordinator(self.engine, self.blobs))
        self.ledger = Ledger(self.engine, root, factory, self.pricing, tx_wait=5.0, clock=lambda: self.d.now)

    def restart_ledger(self, factory=None) -> Ledger:
        """A new Ledger on the same database and data dir (a restarted coordinator); same chain by default."""
        chain = self.ledger.chain
        self.ledger = Ledger(self.engine, self.root, factory or (lambda: chain), self.pricing, tx_wait=5.0,
                             clock=lambda: self.d.now)
        return self.ledger

    def connect(self, ident: bytes, wallet: str | None = None) -> None:
        wallet = wallet_of(ident.decode()) if wallet is None else wallet
        self.d.send((ident, P.Hello(ident.decode(), wallet, 8, {"runtimes": ["blender"]}, [])))

    def render(self, ident: bytes, n: int, seconds: float) -> list[list[int]]:
        """``ident`` takes up to ``n`` queued tasks, one at a time, and returns each result ``seconds`` after
        its lease (the coordinator's clock: what pay is measured by)."""
        done = []
        for _ in range(n):
            leased = of(self.d.send((ident, P.Ready(1))), P.Task, ident)
            if not leased:
                break
            t = leased[0]
            outs = [output_blob(self.blobs, f, f"{ident!r}{t.attempt}") for f in t.spec["frames"]]
            # the result comes ``seconds`` after the lease (the coordinator pays no more time than that);
            # the other workers' heartbeats keep them connected meanwhile
            alive = [(i, P.Heartbeat([])) for i in self.d.coord.conns if i != ident]
            result = (ident, P.Result(t.task_id, t.attempt, outs, seconds))
            assert of(self.d.send(result, *alive, dt=seconds), P.Ack)[0].accepted
            done.append(t.spec["frames"])
        return done

    def settle(self) -> None:
        self.ledger.sync()
        for job_id in self.ledger.to_fund():  # as the Settler does, on the coordinator's thread
            self.ledger.fund(job_id)
        for job_id in self.ledger.to_finalize():
            self.ledger.finalize(job_id)

    def st(self, job_id: int) -> Settlement:
        return get(self.engine, Settlement, job_id)

    def job(self, job_id: int) -> Job:
        return get(self.engine, Job, job_id)

    @property
    def chain(self) -> ch.Chain:
        return self.ledger.chain

    def txs(self, kind: str, job_id: int | None = None) -> list[ChainTx]:
        return [t for t in rows(self.engine, ChainTx, ChainTx.kind == kind)
                if job_id is None or t.job_id == job_id]

    def events(self, name: str, job_id: int) -> list:
        key = int(self.st(job_id).escrow_job)
        return [e for e in self.chain.events(0, self.chain.block_number())
                if e.name == name and e.args.get("job_id") == key]


@pytest.fixture
def farm(tmp_path, db_url):  # the tests taking it run on SQLite and on PostgreSQL
    return Farm(tmp_path / "farm", url=db_url)


def rendered_job(f: Farm, frames: str = "1-4", split=((b"w1", 2, 2.5), (b"w2", 2, 4.0))) -> int:
    """A job whose deposit is in escrow, rendered by the given workers (ident, tasks, seconds each)."""
    job_id = make_job(f.engine, f.blobs, f.alice, frames=frames, hold_for_deposit=True)
    assert f.job(job_id).status == "funding"
    f.settle()
    assert f.st(job_id).status == "open", f.st(job_id)
    assert f.job(job_id).status == "queued", "leased once its deposit is confirmed"
    for ident, n, secs in split:
        f.connect(ident)
        f.render(ident, n, secs)
    assert f.job(job_id).status == "rendered"
    f.settle()
    return job_id


def test_a_pass_takes_a_new_deposit_before_other_jobs_payouts_and_says_so_at_once(farm):
    """A job waiting for its deposit has a worker waiting for it: in one pass its deposit goes before an
    approved job's payout transactions, and the ledger announces it funded (the Settler queues it then)
    before the pass moves on to the payouts."""
    f = farm
    done = rendered_job(f)
    review.approve_job(f.engine, done, f.alice)
    new = make_job(f.engine, f.blobs, f.alice, frames="1-2", hold_for_deposit=True)
    assert new > done
    order: list[str] = []
    f.ledger.seam = lambda kind, at: order.append(f"{kind}:{at}") if at == "sent" else None
    f.ledger.funded_hook = lambda job_id: order.append(f"funded {job_id}")
    f.settle()
    assert order[:2] == ["open:sent", f"funded {new}"], order
    assert "approve:sent" in order[2:], order
    assert f.job(new).status == "queued" and f.job(done).status == "paid"


def test_a_custodial_creators_next_jobs_open_with_one_transaction(farm):
    """The first deposit allows the escrow the wallet's whole balance (only this wallet's key can spend it:
    open_job pulls from msg.sender), so the next jobs' deposits are one transaction, not two."""
    f = farm
    first = make_job(f.engine, f.blobs, f.alice, frames="1-2", hold_for_deposit=True)
    f.settle()
    creator = f.st(first).creator
    assert [t.kind for t in f.txs("allow", first)] == ["allow"] and f.st(first).status == "open"
    left = f.chain.token_balance(creator)
    assert f.chain.allowance(creator) == left > int(f.st(first).deposit), "the rest of the balance is allowed"
    for frames in ("3-4", "5-6"):
        job_id = make_job(f.engine, f.blobs, f.alice, frames=frames, hold_for_deposit=True)
        f.settle()
        assert f.st(job_id).status == "open" and f.job(job_id).status == "queued"
        assert f.txs("allow", job_id) == [] and len(f.txs("open", job_id)) == 1
        assert f.chain.escrow_job(int(f.st(job_id).escrow_job)).deposit == int(f.st(job_id).deposit)
        left -= int(f.st(job_id).deposit)
        assert f.chain.token_balance(creator) == left == f.chain.allowance(creator)


def test_approval_pays_each_worker_exactly_its_share_once(farm):
    f = farm
    job_id = rendered_job(f)
    st = f.st(job_id)
    assert st.status == "posted" and int(st.deposit) > 0
    assert f.chain.escrow_job(int(st.escrow_job)).deposit == int(st.deposit)
    shares = {p.worker_id: int(p.amount) for p in rows(f.engine, Payout, Payout.job_id == job_id)}
    # 2 frames each at the job's reference 2.5 s a frame (the fastest renders): w2 took 4 s a frame and
    # earns no more for the same frames (work is measured by the coordinator, not claimed or padded)
    assert shares == {"w1": f.pricing.cost(5000), "w2": f.pricing.cost(5000)}
    assert f.chain.credit(wallet_of("w1")) == 0, "nothing is paid before the creator approves"

    review.approve_job(f.engine, job_id, f.alice)
    review.approve_job(f.engine, job_id, f.alice)  # a double approve changes nothing
    f.settle()
    f.settle()
    assert f.job(job_id).status == "paid" and f.st(job_id).status == "paid"
    assert len(f.txs("approve", job_id)) == 1 and len(f.events("JobApproved", job_id)) == 1
    for w in ("w1", "w2"):
        assert f.chain.credit(wallet_of(w)) == shares[w]
        before = f.chain.token_balance(wallet_of(w))
        f.ledger.withdraw_for(wallet_of(w))
        assert f.chain.token_balance(wallet_of(w)) - before == shares[w]
    total = sum(shares.values())
    assert f.chain.credit(f.chain.operator) == total * 250 // 10_000
    assert f.chain.credit(st.creator) == int(st.deposit) - total - total * 250 // 10_000
    assert {p.status for p in rows(f.engine, Payout, Payout.job_id == job_id)} == {"credited"}
    mirrored = [e.name for e in rows(f.engine, ChainEvent, ChainEvent.job_id == job_id, order=ChainEvent.id)]
    assert mirrored == ["JobOpened", "PayoutsPosted", "JobApproved"]
    assert all(e.tx_hash.startswith("0x") and e.block > 0 for e in rows(f.engine, ChainEvent))
    assert f.ledger.reconcile()["mismatch"] == []


def test_reject_rerenders_then_approval_pays_the_new_work(farm):
    f = farm
    job_id = rendered_job(f, "1-4", ((b"w1", 2, 1.0), (b"w2", 2, 3.0)))
    w2_frames = sorted(o.frame for o in jobs.outputs(new_session(f.engine), f.job(job_id)) if o.worker_id == "w2")
    view = review.reject_job(f.engine, job_id, f.alice, [w2_frames[0]], "flickering shadow")
    assert view["status"] == "rejected" and view["requeued_tasks"] == 1
    assert [a.outcome for a in rows(f.engine, Attempt, Attempt.job_id == job_id)].count("rejected") == 1
    with pytest.raises(jobs.JobError, match="only a rendered job"):
        review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    assert f.chain.escrow_job(int(f.st(job_id).escrow_job)).state == "disputed"
    f.render(b"w1", 1, 1.0)  # w1 renders the rejected frame again
    assert f.job(job_id).status == "rendered"
    f.settle()
    assert f.st(job_id).payout_round == 2 and f.chain.escrow_job(int(f.st(job_id).escrow_job)).round == 2
    review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    assert f.job(job_id).status == "paid"
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(3000)  # frames 1, 2 and the re-render
    assert f.chain.credit(wallet_of("w2")) == f.pricing.cost(1000)  # its kept frame, at the reference 1 s (it took 3)
    assert [e.name for e in rows(f.engine, ChainEvent, ChainEvent.job_id == job_id, order=ChainEvent.id)] == \
        ["JobOpened", "PayoutsPosted", "JobRejected", "PayoutsPosted", "JobApproved"]


@pytest.mark.parametrize("stage", ["sent", "signed"])
def test_restart_between_tx_and_receipt_pays_once(farm, stage):
    f = farm
    job_id = rendered_job(f)
    review.approve_job(f.engine, job_id, f.alice)

    def die(kind, at):
        if kind == "approve" and at == stage:
            raise Crash(f"coordinator died after the approve tx was {at}")
    f.ledger.seam = die
    with pytest.raises(Crash):
        f.settle()
    tx = f.txs("approve", job_id)[0]
    assert tx.status == stage and f.job(job_id).status == "approved"
    assert f.chain.knows(tx.tx_hash) == (stage == "sent")
    f.restart_ledger()
    f.settle()
    assert f.job(job_id).status == "paid"
    assert [t.tx_hash for t in f.txs("approve", job_id)] == [tx.tx_hash], "the same transaction, never a second"
    assert len(f.events("JobApproved", job_id)) == 1
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(5000)


def test_a_chain_that_is_down_delays_settlement_without_losing_it(farm, monkeypatch):
    f = farm
    job_id = rendered_job(f)
    review.approve_job(f.engine, job_id, f.alice)

    def down(fn):
        raise ch.ChainUnavailable("chain node unreachable (test)")
    monkeypatch.setattr(f.chain, "_io", down)
    for _ in range(3):
        with pytest.raises(ch.ChainUnavailable):
            f.settle()
    assert f.job(job_id).status == "approved" and f.txs("approve", job_id) == []
    monkeypatch.undo()
    f.settle()
    assert f.job(job_id).status == "paid" and len(f.events("JobApproved", job_id)) == 1


def test_canceled_job_with_no_accepted_work_gets_its_deposit_back(farm):
    f = farm
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1-3")
    f.settle()
    st = f.st(job_id)
    with new_session(f.engine) as s:
        jobs.cancel_job(s, s.get(Job, job_id))
        s.commit()
    f.settle()
    assert f.st(job_id).status == "released"
    assert f.chain.credit(st.creator) == int(st.deposit)


@pytest.mark.parametrize("when", ["mid_render", "rendered"])
def test_cancel_pays_the_work_already_accepted_and_refunds_only_the_rest(farm, when):
    """The attack: let the workers render, then cancel to get the whole deposit back. Cancelling settles
    the accepted work first (as an approval of it would) and refunds only the rest; a rendered job
    cancelled is a rendered job approved."""
    f = farm
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1-4")
    f.settle()
    st = f.st(job_id)
    f.connect(b"w1")
    f.render(b"w1", 2 if when == "mid_render" else 4, 2.0)
    if when == "rendered":
        assert f.job(job_id).status == "rendered"
        f.settle()
    f.d.coord.cancel_job(job_id, f.alice)
    assert f.job(job_id).status == "canceled"
    http = TestClient(create_app(f.engine, f.blobs, ledger=f.ledger))
    auth = {"Authorization": f"Bearer {f.alice_token}"}
    outs = http.get(f"/api/jobs/{job_id}/outputs", headers=auth).json()
    assert outs and not any("sha256" in o for o in outs), "not released before the frames are paid"
    refused = http.get(f"/api/jobs/{job_id}/outputs/{outs[0]['name']}", headers=auth)
    assert refused.status_code == 403 and "once their payment is settled" in refused.json()["detail"]
    f.settle()
    f.settle()
    done = 2 if when == "mid_render" else 4
    # the frames it paid for are the creator's: released once the payment is settled
    outs = [o for o in http.get(f"/api/jobs/{job_id}/outputs", headers=auth).json() if "sha256" in o]
    assert len(outs) == done
    got = http.get(f"/api/jobs/{job_id}/outputs/{outs[0]['name']}", headers=auth)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == outs[0]["sha256"]
    paid = f.pricing.cost(done * 2000)
    assert f.chain.credit(wallet_of("w1")) == paid, "the worker is paid for every frame it delivered"
    assert f.chain.credit(st.creator) == int(st.deposit) - paid - f.pricing.fee(paid), "only the rest comes back"
    assert f.st(job_id).status == "paid" and f.job(job_id).status == "canceled"
    assert f.txs("release", job_id) == [] and len(f.events("JobApproved", job_id)) == 1


def test_refund_after_the_deadline_is_mirrored(tmp_path):
    f = Farm(tmp_path / "farm", pricing=pr.Pricing(deadline_seconds=60))
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1")
    f.settle()
    key = f.ledger.custody.key_of(f.alice.id)
    escrow_job = int(f.st(job_id).escrow_job)
    with pytest.raises(ch.TxRejected, match="deadline not reached"):
        f.chain.sign(key, f.chain.refund(escrow_job))
    f.chain.advance_time(120)
    f.chain.wait(f.chain.sign(key, f.chain.refund(escrow_job)))  # the creator's own tx
    f.settle()
    assert f.st(job_id).status == "refunded"
    assert [e.name for e in rows(f.engine, ChainEvent, ChainEvent.job_id == job_id)] == ["JobOpened", "JobRefunded"]


def test_a_worker_without_wallet_is_not_paid_and_its_share_stays_with_the_creator(farm):
    f = farm
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1-2")
    f.settle()
    f.connect(b"w1")
    f.connect(b"nowallet", wallet="")
    f.render(b"w1", 1, 2.0)
    f.render(b"nowallet", 1, 2.0)
    f.settle()
    pays = {p.worker_id: p for p in rows(f.engine, Payout, Payout.job_id == job_id)}
    assert pays["nowallet"].status == "unpayable" and pays["w1"].status == "computed"
    review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    st = f.st(job_id)
    paid = f.pricing.cost(2000)
    assert f.chain.credit(wallet_of("w1")) == paid
    assert f.chain.credit(st.creator) == int(st.deposit) - paid - f.pricing.fee(paid)


def test_payouts_are_scaled_to_the_deposit_when_the_job_costs_more(tmp_path):
    f = Farm(tmp_path / "farm", pricing=pr.Pricing(price_per_unit=pr.to_wei("1"), default_seconds_per_frame=1,
                                                   deposit_margin=pr.Decimal("1"), min_deposit=1))
    # each frame is worth the job's reference 10 s (w1's 30 s a frame earn it nothing more): w1 did 2 frames
    job_id = rendered_job(f, "1-3", ((b"w1", 2, 30.0), (b"w2", 1, 10.0)))
    st = f.st(job_id)
    assert st.capped and int(st.payout_total) + int(st.fee) <= int(st.deposit)
    review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    c1, c2 = f.chain.credit(wallet_of("w1")), f.chain.credit(wallet_of("w2"))
    assert c1 + c2 == int(st.payout_total) and abs(c1 - 2 * c2) <= 2  # shares keep their proportion


def test_a_reset_chain_takes_unsettled_deposits_again_and_keeps_history(farm):
    f = farm
    paid = rendered_job(f, "1")
    review.approve_job(f.engine, paid, f.alice)
    open_job = make_job(f.engine, f.blobs, f.alice, frames="2")
    f.settle()
    assert f.job(paid).status == "paid" and f.st(open_job).status == "open"
    f.restart_ledger(ch.Chain.embedded_evm)  # the embedded chain lives in memory: a restart starts afresh
    f.settle()
    assert f.ledger.epoch == 2 and f.ledger.report["mismatch"] == []
    assert [t.epoch for t in f.txs("open", open_job)] == [1, 2], "deposited again on the new chain"
    assert f.st(open_job).status == "open" and f.chain.escrow_job(int(f.st(open_job).escrow_job)).state == "open"
    assert f.st(paid).status == "paid" and f.job(paid).status == "paid"


def test_estimate_uses_render_history(farm):
    f = farm
    with new_session(f.engine) as s:
        first = pr.estimate(s, f.pricing, 10)
    assert first["basis"].startswith("default") and first["seconds_per_unit"] == 10
    rendered_job(f, "1-2", ((b"w1", 2, 3.0),))
    with new_session(f.engine) as s:
        scene = s.get(Job, 1).spec["scene_sha256"]
        again = pr.estimate(s, f.pricing, 10, scene, s.get(Job, 1).spec["settings"])
    assert "this scene" in again["basis"] and again["seconds_per_unit"] == 3.0
    assert int(again["cost"]) == f.pricing.cost(30_000) and int(again["deposit"]) >= int(again["cost"])


# ------------------------------------------------------------------ HTTP routes
def test_http_estimate_payment_approve_reject_payouts_wallets(farm):
    f = farm
    app = create_app(f.engine, f.blobs, broker=None, ledger=f.ledger)
    http = TestClient(app)
    alice = {"Authorization": f"Bearer {f.alice_token}"}
    _, bob_token = make_user(f.engine, "bob")
    bob = {"Authorization": f"Bearer {bob_token}"}
    est = http.post("/api/estimate", json={"frames": "1-10", "samples": 4}, headers=alice)
    assert est.status_code == 200 and est.json()["units"] == 10, est.text
    assert http.post("/api/estimate", json={"frames": "9-1"}, headers=alice).status_code == 422
    job_id = rendered_job(f)
    pay = http.get(f"/api/jobs/{job_id}/payment", headers=alice).json()
    assert pay["status"] == "posted" and pay["escrow"] and [t["kind"] for t in pay["transactions"]] == \
        ["allow", "open", "post"]
    payouts = http.get(f"/api/jobs/{job_id}/payouts", headers=alice).json()
    assert {w["worker_id"]: w["amount"] for w in payouts["workers"]} == \
        {"w1": str(f.pricing.cost(5000)), "w2": str(f.pricing.cost(5000))}  # the same rate a frame
    assert http.get(f"/api/jobs/{job_id}/payment", headers=bob).status_code == 404
    assert http.post(f"/api/jobs/{job_id}/approve", headers=bob).status_code == 404
    r = http.post(f"/api/jobs/{job_id}/reject", json={"frames": "99", "reason": "x"}, headers=alice)
    assert r.status_code == 422 and "no rendered frame 99" in r.json()["detail"]
    for _ in range(2):
        r = http.post(f"/api/jobs/{job_id}/approve", headers=alice)
        assert r.status_code == 200 and r.json()["status"] == "approved"
    assert http.post(f"/api/jobs/{job_id}/reject", json={"frames": "1"}, headers=alice).status_code == 409
    f.settle()
    assert http.get(f"/api/jobs/{job_id}/payment", headers=alice).json()["status"] == "paid"
    w1 = wallet_of("w1")
    bal = http.get(f"/api/wallets/{w1}", headers=bob).json()
    assert bal["escrow_credit"] == str(f.pricing.cost(5000)) and bal["token"] == "0"
    r = http.post(f"/api/wallets/{w1}/withdraw", headers=bob)
    assert r.status_code == 200 and r.json()["amount"] == str(f.pricing.cost(5000))
    assert http.post(f"/api/wallets/{w1}/withdraw", headers=bob).status_code == 409
    assert http.get(f"/api/wallets/{w1}", headers=bob).json()["token"] == str(f.pricing.cost(5000))
    assert http.get("/api/wallets/0xnope", headers=bob).status_code == 422
    mine = http.get("/api/wallet", headers=alice).json()
    assert mine["address"] == f.st(job_id).creator and int(mine["escrow_credit"]) > 0


# ------------------------------------------------------------------ anvil: a real node process
def _anvil_farm(tmp_path, anvil_node) -> Farm:  # noqa: F811
    key = ch.read_key_file(anvil_node.key_file)
    return Farm(tmp_path / "farm", factory=lambda: ch.Chain.connect(anvil_node.url, key, timeout=3))


def test_anvil_stopped_during_settlement_then_restarted_settles_once(tmp_path, anvil):  # noqa: F811
    f = _anvil_farm(tmp_path, anvil)
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1-2")
    f.settle()
    for ident in (b"w1", b"w2"):
        f.connect(ident)
        f.render(ident, 1, 2.0)
    review.approve_job(f.engine, job_id, f.alice)
    stops = []

    def stop_node(kind, at):
        if (kind, at) in (("post", "sent"), ("approve", "signed")) and (kind, at) not in stops:
            stops.append((kind, at))
            anvil.stop()  # the node goes down in the middle of the settlement
    f.ledger.seam = stop_node
    for _ in range(2):
        with pytest.raises(ch.ChainUnavailable):
            f.settle()
        assert f.job(job_id).status == "approved"
        with pytest.raises(ch.ChainUnavailable):
            f.settle()  # still down: retried, nothing lost, nothing duplicated
        anvil.start()
    f.settle()
    assert stops == [("post", "sent"), ("approve", "signed")]
    assert f.job(job_id).status == "paid"
    assert len(f.txs("post", job_id)) == 1 and len(f.txs("approve", job_id)) == 1
    assert len(f.events("PayoutsPosted", job_id)) == 1 and len(f.events("JobApproved", job_id)) == 1
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(2000) == f.chain.credit(wallet_of("w2"))


def test_anvil_restart_of_the_coordinator_after_tx_sent_pays_once(tmp_path, anvil):  # noqa: F811
    f = _anvil_farm(tmp_path, anvil)
    job_id = rendered_job(f, "1-2", ((b"w1", 2, 2.0),))
    review.approve_job(f.engine, job_id, f.alice)

    def die(kind, at):
        if (kind, at) == ("approve", "sent"):
            raise Crash("died after sending")
    f.ledger.seam = die
    with pytest.raises(Crash):
        f.settle()
    key = ch.read_key_file(anvil.key_file)
    f.restart_ledger(lambda: ch.Chain.connect(anvil.url, key))
    report = f.ledger.reconcile()
    assert report["mismatch"] == []
    f.settle()
    assert f.job(job_id).status == "paid" and len(f.events("JobApproved", job_id)) == 1
    assert len(f.txs("approve", job_id)) == 1
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(4000)


def test_a_job_left_unreviewed_is_approved_and_paid_after_the_review_window(farm):
    """Silence does not leave workers unpaid: a rendered job neither approved nor rejected within the
    review window (72 h) is approved and settled like any other; within the window, nothing happens."""
    from farm.payments.ledger import REVIEW_WINDOW_SECONDS
    f = farm
    job_id = rendered_job(f)
    f.d.now += REVIEW_WINDOW_SECONDS - 60
    f.settle()
    assert f.job(job_id).status == "rendered" and f.chain.credit(wallet_of("w1")) == 0
    f.d.now += 61
    assert f.ledger.auto_approve() == [job_id]
    f.settle()
    assert f.job(job_id).status == "paid"
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(5000) == f.chain.credit(wallet_of("w2"))
    events = [e for e in rows(f.engine, Event, Event.job_id == job_id) if e.kind == "job" and e.new == "approved"]
    assert len(events) == 1 and "not reviewed within 72 h" in events[0].detail
