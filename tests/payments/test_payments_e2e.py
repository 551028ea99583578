"""Payments end to end with real processes: `farm serve` (its settler on the embedded EVM, or on a real
anvil node), `farm worker` daemons rendering the sample scene with Blender, the HTTP client.

Submit → render → approve: each worker's token balance grows by exactly its share; reject → re-render →
approve; the coordinator killed between sending the approval and its receipt pays once; anvil down while
an approval waits delays the payment without losing or duplicating it.
"""
from __future__ import annotations

import time

import pytest

from tests.anvil import Anvil, anvil, anvil_binary  # noqa: F401  (fixture)
from tests.conftest import submit_sample, wait_for, wait_job, wait_workers
from tests.payments.test_ledger import wallet_of

pytestmark = pytest.mark.slow
FAST = {"RENDERHIVE_SETTLE_INTERVAL": "0.3", "RENDERHIVE_SETTLE_MAX_BACKOFF": "1"}


@pytest.fixture(params=["embedded", "anvil"])
def chain_env(request, tmp_path):
    if request.param == "embedded":
        yield dict(FAST)
        return
    binary = anvil_binary()
    if binary is None:
        pytest.fail("anvil is not installed: run `make test` (installs it into .tools/)")
    node = Anvil(tmp_path / "anvil", binary).start()
    yield {**FAST, **node.env()}
    node.stop()


def payment_is(client, job_id: int, *statuses: str, timeout: float = 60):
    return wait_for(lambda: (lambda p: p if p["status"] in statuses else None)(client.payment(job_id)), timeout,
                    interval=0.2, what=f"job {job_id} payment to reach {statuses}")


def shares(client, job_id: int) -> dict[str, int]:
    pay = client.payouts(job_id)
    quote = client.job(job_id)["spec"].get("quote")  # the rate locked at submit: the market moves with load
    price = int(quote["rate"]) if quote else int(client.estimate(frames="1")["price_per_unit"])
    out = {}
    for w in pay["workers"]:
        measured_ms = round(w["work_seconds"] * 1000) + round(w["check_seconds"] * 1000)  # frames and checks
        assert int(w["amount"]) == measured_ms * price // 1000, "paid by measured work"
        out[w["wallet"]] = out.get(w["wallet"], 0) + int(w["amount"])
    return out


def test_real_workers_are_paid_exactly_their_share(farm, worker, chain_env):
    f = farm(chain_env)
    wallets = {w: wallet_of(w) for w in ("w1", "w2")}
    for w, addr in wallets.items():
        worker(f, w, env={"RENDERHIVE_WALLET": addr})
    alice = f.creator("alice")
    wait_workers(alice, 2)
    est = alice.estimate(frames="1-4", resolution_percent=20, samples=4)
    assert est["units"] == 4 and int(est["deposit"]) > 0
    job = submit_sample(alice, "1-4")
    pay = payment_is(alice, job["id"], "open", "posted")
    assert int(pay["deposit"]) > 0 and pay["creator_wallet"].startswith("0x")
    assert wait_job(alice, job["id"])["status"] == "rendered"
    payment_is(alice, job["id"], "posted")
    owed = shares(alice, job["id"])
    assert set(owed) == set(wallets.values()) and all(v > 0 for v in owed.values())
    before = {a: int(alice.wallet(a)["token"]) for a in wallets.values()}
    alice.approve(job["id"])
    alice.approve(job["id"])  # twice: pays once
    payment_is(alice, job["id"], "paid")
    assert alice.job(job["id"])["status"] == "paid"
    for addr in wallets.values():
        assert int(alice.withdraw(addr)["amount"]) == owed[addr]
        assert int(alice.wallet(addr)["token"]) - before[addr] == owed[addr]
    assert [e["name"] for e in alice.payment(job["id"])["events"]].count("JobApproved") == 1

    # reject a frame: it is rendered again, and the new list is what gets approved
    job2 = submit_sample(alice, "5-6")
    assert wait_job(alice, job2["id"])["status"] == "rendered"
    payment_is(alice, job2["id"], "posted")
    view = alice.reject(job2["id"], "5", "the turntable is cut off")
    assert view["status"] == "rejected" and view["requeued_tasks"] == 1
    assert wait_job(alice, job2["id"])["status"] == "rendered"
    wait_for(lambda: alice.payouts(job2["id"])["round"] == 2 and alice.payment(job2["id"])["status"] == "posted",
             60, what="the second payout list posted")
    owed2 = shares(alice, job2["id"])
    credit = {a: int(alice.wallet(a)["escrow_credit"]) for a in wallets.values()}
    alice.approve(job2["id"])
    payment_is(alice, job2["id"], "paid")
    for addr in wallets.values():
        assert int(alice.wallet(addr)["escrow_credit"]) - credit[addr] == owed2.get(addr, 0)
    names = [e["name"] for e in alice.payment(job2["id"])["events"]]
    assert names == ["JobOpened", "PayoutsPosted", "JobRejected", "PayoutsPosted", "JobApproved"]


def test_coordinator_killed_after_sending_the_approval_pays_once(farm, worker, anvil):  # noqa: F811
    f = farm({**FAST, **anvil.env(), "RENDERHIVE_LEDGER_CRASH_AFTER": "approve:sent"})
    addr = wallet_of("w1")
    worker(f, "w1", env={"RENDERHIVE_WALLET": addr})
    alice = f.creator("alice")
    wait_workers(alice, 1)
    first, second = submit_sample(alice, "1-2"), submit_sample(alice, "3")
    for job in (first, second):
        assert wait_job(alice, job["id"])["status"] == "rendered"
        payment_is(alice, job["id"], "posted")
    owed = shares(alice, first["id"])[addr]

    alice.approve(first["id"])
    wait_for(lambda: not f.alive, 60, what="farm serve to die right after sending the approval")
    assert f.p.returncode == 86
    f.env.pop("RENDERHIVE_LEDGER_CRASH_AFTER")
    f.start()  # same data dir, same chain
    payment_is(alice, first["id"], "paid")
    pay = alice.payment(first["id"])
    assert [t["kind"] for t in pay["transactions"]].count("approve") == 1
    assert [e["name"] for e in pay["events"]].count("JobApproved") == 1
    assert int(alice.wallet(addr)["escrow_credit"]) == owed

    # the node goes down while the second approval waits: it is paid once the node is back
    owed2 = shares(alice, second["id"])[addr]
    anvil.stop()
    alice.approve(second["id"])
    time.sleep(3)
    assert alice.job(second["id"])["status"] == "approved", "not paid while the chain is down"
    anvil.start()
    payment_is(alice, second["id"], "paid")
    assert [e["name"] for e in alice.payment(second["id"])["events"]].count("JobApproved") == 1
    assert int(alice.wallet(addr)["escrow_credit"]) == owed + owed2


def test_a_padding_worker_that_lies_about_its_seconds_earns_no_more_a_frame(farm, worker, procs):
    """The attack: a worker holds each task 3 s longer than its render and reports a million seconds of
    render time; it passes every check (its pixels are Blender's). Pay is measured by the coordinator's
    clock at the job's fastest rate: per frame it earns what the honest worker earns, not 87 times more."""
    from client import localfarm
    from tests.conftest import TEST_ENV
    f = farm(dict(FAST))
    worker(f, "honest", env={"RENDERHIVE_WALLET": wallet_of("honest")})
    liar = localfarm.WorkerProc(f.root / "liar", f, "liar", localfarm.process_env(
        {**TEST_ENV, "RENDERHIVE_WALLET": wallet_of("liar")}), gpus="none", module="tests.helpers.slow_worker",
        argv_prefix=["--delay", "3", "--claim", "1000000"])
    procs.append(liar)
    liar.start()
    alice = f.creator("alice")
    wait_workers(alice, 2)
    job = submit_sample(alice, "1-6")
    assert wait_job(alice, job["id"])["status"] == "rendered"
    payment_is(alice, job["id"], "posted")
    rows = {w["worker_id"]: w for w in alice.payouts(job["id"])["workers"]}
    assert {"honest", "liar"} <= set(rows), rows  # both rendered frames of the job
    per_frame = {w: r["work_seconds"] / r["tasks"] for w, r in rows.items()}  # checks are paid apart
    assert per_frame["liar"] <= per_frame["honest"] + 1e-9, per_frame  # the same rate a frame, whoever is slower
    # its lie is recorded as a statistic only: the coordinator paid none of the million seconds
    assert rows["liar"]["work_seconds"] < 3 * rows["liar"]["tasks"], rows["liar"]
    owed = shares(alice, job["id"])
    alice.approve(job["id"])
    payment_is(alice, job["id"], "paid")
    assert int(alice.wallet(wallet_of("liar"))["escrow_credit"]) == owed[wallet_of("liar")]
