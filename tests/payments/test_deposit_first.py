"""Deposit before work (issue 17): with payments on, a job's tasks are leased only after its deposit is
confirmed in escrow — from the creator's own wallet, for at least the quoted amount, in the farm's token —
unless the operator gave the creator a credit line. A real coordinator driven by ``step``, a real SQLite
file or PostgreSQL, the embedded EVM (eth-tester), and the real HTTP routes."""
from __future__ import annotations

from fastapi.testclient import TestClient

from common import protocol as P
from farm.payments import chain as ch
from farm.store.models import Event, Task
from farm.web.app import create_app
from tests.fixtures_inproc import make_job, make_user, of, put_scene, rows
from tests.payments.test_ledger import farm, rendered_job  # noqa: F401  (fixture)


def test_no_task_is_leased_before_the_deposit_is_confirmed(farm):  # noqa: F811
    f = farm
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1-2", hold_for_deposit=True)
    f.connect(b"w1")
    assert of(f.d.send((b"w1", P.Ready(2))), P.Task, b"w1") == [], "a funding job is not leased"
    assert {t.status for t in rows(f.engine, Task, Task.job_id == job_id)} == {"queued"}
    f.settle()
    st = f.st(job_id)
    assert st.status == "open" and f.chain.escrow_job(int(st.escrow_job)).deposit == int(st.deposit) > 0
    assert f.job(job_id).status == "queued"
    moves = [(e.old, e.new, e.detail) for e in rows(f.engine, Event, Event.job_id == job_id, Event.kind == "job")]
    assert moves[0][1] == "funding" and moves[1][:2] == ("funding", "queued"), moves
    assert "deposit of" in moves[1][2] and "confirmed in escrow" in moves[1][2]
    leased = of(f.d.send((b"w1", P.Ready(2))), P.Task, b"w1")
    assert len(leased) == 2, "leased once the escrow holds the deposit"


def test_an_escrow_opened_by_someone_else_under_the_jobs_id_is_not_its_deposit(farm):  # noqa: F811
    """The attack: front-run the job's open_job with a deposit of 1 wei from the attacker's own wallet, so
    that the farm takes it for the creator's deposit and renders (and later pays) against nothing."""
    f = farm
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1", hold_for_deposit=True)
    chain = f.ledger.ensure_ready()
    f.ledger._open_settlements()
    squatted = int(f.st(job_id).escrow_job)
    mallory = "0x" + "7" * 64
    who = ch.address_of(mallory)
    chain.wait(chain.sign(chain.operator_key, to=who, value=ch.DEV_ETH))
    chain.wait(chain.sign(chain.operator_key, chain.mint(who, 10)))
    chain.wait(chain.sign(mallory, chain.approve_spend(chain.escrow.address, 10)))
    chain.wait(chain.sign(mallory, chain.open_job(squatted, 1, chain.timestamp() + 3600)))
    assert chain.escrow_job(squatted).creator.lower() == who.lower()

    f.ledger.sync()
    st = f.st(job_id)
    assert f.job(job_id).status == "funding", "not leased on someone else's escrow"
    assert f"was opened by {chain.escrow_job(squatted).creator}, not by the creator's wallet" in st.error
    assert int(st.escrow_job) != squatted, "the job deposits under a new escrow id"
    for _ in range(3):
        f.settle()
    st = f.st(job_id)
    assert f.job(job_id).status == "queued" and st.status == "open" and st.error == ""
    mine = chain.escrow_job(int(st.escrow_job))
    assert mine.creator.lower() == st.creator.lower() != who.lower() and mine.deposit == int(st.deposit)
    assert chain.escrow_job(squatted).deposit == 1 and chain.escrow_job(squatted).state == "open", \
        "the squatter's escrow is left alone (its deadline refunds it to the squatter)"


def test_a_credit_line_lets_a_creator_start_before_the_deposit(farm):  # noqa: F811
    f = farm
    admin, admin_token = make_user(f.engine, "root", admin=True)
    app = create_app(f.engine, f.blobs, ledger=f.ledger)
    with TestClient(app) as http:
        def as_(token):
            return {"Authorization": f"Bearer {token}"}
        made = http.post("/api/users", json={"name": "bob", "credit_line": True}, headers=as_(admin_token))
        assert made.status_code == 201 and made.json()["credit_line"] is True
        bob = made.json()["token"]
        scene = put_scene(f.blobs)
        job = http.post("/api/jobs", json={"scene_sha256": scene, "frames": "1"}, headers=as_(bob)).json()
        assert job["status"] == "queued", "a creator with a credit line is leased at once"
        plain = http.post("/api/jobs", json={"scene_sha256": scene, "frames": "1"}, headers=as_(f.alice_token))
        assert plain.json()["status"] == "funding", "everyone else waits for the deposit"

        refused = http.put("/api/users/bob/credit", json={"credit_line": False}, headers=as_(bob))
        assert refused.status_code == 403 and "only the admin sets credit lines" in refused.json()["detail"]
        off = http.put("/api/users/bob/credit", json={"credit_line": False}, headers=as_(admin_token))
        assert off.json() == {"name": "bob", "credit_line": False}
        again = http.post("/api/jobs", json={"scene_sha256": scene, "frames": "2"}, headers=as_(bob)).json()
        assert again["status"] == "funding"
        missing = http.put("/api/users/nobody/credit", json={"credit_line": True}, headers=as_(admin_token))
        assert missing.status_code == 404 and "no user 'nobody'" in missing.json()["detail"]


def test_a_funded_job_renders_and_pays_as_before(farm):  # noqa: F811
    f = farm
    job_id = rendered_job(f)  # funding → queued → rendered, deposit checked on the way
    st = f.st(job_id)
    assert st.status == "posted" and st.error == ""
