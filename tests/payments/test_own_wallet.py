"""A creator who pays and approves with a wallet of their own, through the HTTP API, on a real EVM (eth-tester
in process), with a real coordinator driven message by message.

The creator's key is one of the chain's own accounts; the farm is never given it. What must hold: the farm
links the wallet only on its signature of a message issued to that account; the job waits for the deposit
from that wallet; the approval and the rejection are that wallet's EIP-712 signatures, relayed — a forged,
replayed or cross-job signature is refused before anything changes; a creator who stays silent is settled
after the review window (never refunded past the workers); a deposit with a short deadline is not accepted;
the custodial balance moves to the linked wallet.
"""
from __future__ import annotations

import pytest
from eth_account import Account
from fastapi.testclient import TestClient

from common import eth_sign
from farm.payments import chain as ch
from farm.payments import own_wallets
from farm.payments.ledger import REVIEW_WINDOW_SECONDS, LedgerError
from farm.store.db import session as new_session
from farm.store.ledger_models import ChainTx
from farm.web.app import create_app
from tests.fixtures_inproc import make_job, make_user, rows
from tests.payments.test_ledger import Farm, wallet_of

T = 10**18


class Creator:
    """alice, with a wallet of her own (an account of the chain's; its key stays here, as in a browser wallet)."""

    def __init__(self, f: Farm, account: int = 5):
        self.f = f
        f.ledger.ensure_ready()
        self.chain = f.chain
        self.key = "0x" + self.chain.backend.account_keys[account].to_bytes().hex()
        self.address = ch.address_of(self.key)
        self.http = TestClient(create_app(f.engine, f.blobs, broker=None, ledger=f.ledger))
        self.auth = {"Authorization": f"Bearer {f.alice_token}"}
        self.chain.wait(self.chain.sign(self.chain.operator_key, self.chain.mint(self.address, 1000 * T)))

    def link(self) -> dict:
        msg = self.http.post("/api/wallet/challenge", json={"address": self.address}, headers=self.auth).json()
        r = self.http.post("/api/wallet/link", json={"message": msg["message"],
                                                     "signature": eth_sign.sign_message(self.key, msg["message"])},
                           headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    def send(self, call: dict) -> None:
        """eth_sendTransaction, as the wallet does it: signed here with the creator's key."""
        w3 = self.chain.w3
        with self.chain.lock:
            tx = {"to": call["to"], "data": call["data"], "value": 0, "gas": 400_000, "chainId": w3.eth.chain_id,
                  "nonce": w3.eth.get_transaction_count(self.address), "gasPrice": w3.eth.gas_price}
            h = w3.eth.send_raw_transaction(Account.sign_transaction(tx, self.key).raw_transaction)
            assert w3.eth.wait_for_transaction_receipt(h).status == 1

    def deposit(self, job_id: int) -> None:
        terms = self.http.get(f"/api/jobs/{job_id}/deposit", headers=self.auth).json()
        assert terms["from"] == self.address and not terms["deposited"], terms
        for call in terms["calls"]:
            self.send(call)

    def sign(self, typed: dict, key: str | None = None) -> str:
        return eth_sign.sign_typed(key or self.key, typed)


def funded_job(f: Farm, c: Creator, frames: str = "1-2") -> int:
    job_id = make_job(f.engine, f.blobs, f.alice, frames=frames, hold_for_deposit=True)
    f.settle()
    assert f.job(job_id).status == "funding" and f.st(job_id).creator == c.address
    c.deposit(job_id)
    f.settle()
    assert f.job(job_id).status == "queued", f.st(job_id).error
    return job_id


def rendered(f: Farm, job_id: int, n: int = 2) -> None:
    f.connect(b"w1")
    f.render(b"w1", n, 2.0)
    assert f.job(job_id).status == "rendered"
    f.settle()
    assert f.st(job_id).status == "posted"


@pytest.fixture
def own(tmp_path):
    f = Farm(tmp_path / "farm")
    c = Creator(f)
    c.link()
    return f, c


def test_linking_needs_the_wallets_signature_of_a_message_issued_to_this_account(tmp_path):
    f = Farm(tmp_path / "farm")
    c = Creator(f)
    _, bob_token = make_user(f.engine, "bob")
    bob = {"Authorization": f"Bearer {bob_token}"}
    other = "0x" + c.chain.backend.account_keys[6].to_bytes().hex()
    ask = lambda h=c.auth: c.http.post("/api/wallet/challenge", json={"address": c.address}, headers=h).json()  # noqa: E731
    link = lambda m, sig, h=c.auth: c.http.post("/api/wallet/link", json={"message": m, "signature": sig}, headers=h)  # noqa: E731

    m = ask()["message"]
    assert "'alice'" in m and f"Chain ID: {c.chain.chain_id()}" in m
    r = link(m, eth_sign.sign_message(other, m))  # signed by another wallet than the one it names
    assert r.status_code == 403 and "not by" in r.json()["detail"]
    assert link(m, eth_sign.sign_message(c.key, m)).status_code == 403, "the nonce was spent by the failed try"
    m = ask()["message"]
    forged = m.replace("'alice'", "'mallory'")
    assert link(forged, eth_sign.sign_message(c.key, forged)).status_code == 403
    r = link(m, eth_sign.sign_message(c.key, m), bob)  # bob replays alice's signed message on his account
    assert r.status_code == 403 and "not issued to your account" in r.json()["detail"]
    assert link("hello", "0x00").status_code == 422
    assert link(m, "0x" + "ab" * 65).status_code == 403
    m = ask()["message"]
    ok = link(m, eth_sign.sign_message(c.key, m))
    assert ok.status_code == 200 and ok.json()["own_address"] == c.address and ok.json()["custodial"] is False
    assert link(m, eth_sign.sign_message(c.key, m)).status_code == 403, "a signed message links once"
    bm = c.http.post("/api/wallet/challenge", json={"address": c.address}, headers=bob).json()["message"]
    r = link(bm, eth_sign.sign_message(c.key, bm), bob)
    assert r.status_code == 409 and "another account" in r.json()["detail"]
    with new_session(f.engine) as s:  # an expired message is refused
        from farm.store.models import User
        alice = s.get(User, f.alice.id)
        late = own_wallets.challenge(f.ledger, s, alice, c.address, "farm", "http://farm/", now=1000.0)
        with pytest.raises(LedgerError, match="expired"):
            own_wallets.link(f.ledger, s, alice, late["message"], eth_sign.sign_message(c.key, late["message"]),
                             now=1000.0 + eth_sign.SIWE_TTL + 1)
    mine = c.http.get("/api/wallet", headers=c.auth).json()
    assert mine["address"] == c.address and mine["custodial"] is False and mine["custodial_address"] != c.address


def test_deposit_from_the_own_wallet_then_approval_by_its_signature_pays_the_workers(own):
    f, c = own
    job_id = funded_job(f, c)
    assert f.txs("open", job_id) == [] and f.txs("allow", job_id) == [], "the farm sent no deposit for the creator"
    rendered(f, job_id)
    r = c.http.post(f"/api/jobs/{job_id}/approve", headers=c.auth)
    assert r.status_code == 409 and "your own wallet" in r.json()["detail"], "no approval without the signature"
    req = c.http.get(f"/api/jobs/{job_id}/approval", headers=c.auth).json()
    assert req["signer"] == c.address and req["payouts"][0]["wallet"] == wallet_of("w1")
    custodial_key = f.ledger.custody.key_of(f.alice.id)  # what the farm could sign with: not the creator's wallet
    for bad, why in ((c.sign(req["typed_data"], custodial_key), "the farm's own key"),
                     (c.sign({**req["typed_data"], "message": {**req["typed_data"]["message"], "round": 7}}), "round"),
                     ("0x" + "11" * 65, "garbage")):
        r = c.http.post(f"/api/jobs/{job_id}/approve", json={"signature": bad}, headers=c.auth)
        assert r.status_code in (403, 422), (why, r.text)
        assert f.job(job_id).status == "rendered", why
    good = c.sign(req["typed_data"])
    for _ in range(2):  # approving twice pays once
        r = c.http.post(f"/api/jobs/{job_id}/approve", json={"signature": good}, headers=c.auth)
        assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    f.settle()
    f.settle()
    assert f.job(job_id).status == "paid"
    again = c.http.post(f"/api/jobs/{job_id}/approve", json={"signature": good}, headers=c.auth)
    assert again.status_code == 200 and again.json()["status"] == "paid", "approving a paid job changes nothing"
    share = f.pricing.cost(4000)
    assert f.chain.credit(wallet_of("w1")) == share
    st = f.st(job_id)
    assert f.chain.credit(c.address) == int(st.deposit) - share - f.pricing.fee(share), "the rest is the creator's"
    assert not [t for t in rows(f.engine, ChainTx) if t.sender.lower() == c.address.lower()], \
        "the farm never signed a transaction as the creator"
    assert len(f.events("JobApproved", job_id)) == 1 and f.events("JobApproved", job_id)[0].args["unreviewed"] is False


def test_a_signature_for_one_job_is_refused_on_another(own):
    f, c = own
    a, b = funded_job(f, c, "1"), funded_job(f, c, "2")
    f.connect(b"w1")
    f.render(b"w1", 2, 2.0)
    f.settle()
    sig_a = c.sign(c.http.get(f"/api/jobs/{a}/approval", headers=c.auth).json()["typed_data"])
    r = c.http.post(f"/api/jobs/{b}/approve", json={"signature": sig_a}, headers=c.auth)
    assert r.status_code == 403 and "another wallet, job or round" in r.json()["detail"]
    assert f.job(b).status == "rendered" and f.chain.escrow_job(int(f.st(b).escrow_job)).state == "posted"
    # and the escrow refuses it too, relayed straight to the contract
    wallets, amounts = f.ledger._current_list(new_session(f.engine), f.st(b))
    with pytest.raises(ch.TxRejected, match="not signed by the creator"):
        f.chain.sign(f.chain.operator_key, f.chain.approve_by_sig(int(f.st(b).escrow_job), wallets, amounts,
                                                                 bytes.fromhex(sig_a[2:])))


def test_rejection_is_the_wallets_signature_of_exactly_these_frames_and_reason(own):
    f, c = own
    job_id = funded_job(f, c)
    rendered(f, job_id)
    body = {"frames": "1", "reason": "flicker"}
    req = c.http.post(f"/api/jobs/{job_id}/rejection", json=body, headers=c.auth).json()
    other = c.http.post(f"/api/jobs/{job_id}/rejection", json={"frames": "1-2", "reason": "flicker"},
                        headers=c.auth).json()
    r = c.http.post(f"/api/jobs/{job_id}/reject", json={**body, "signature": c.sign(other["typed_data"])},
                    headers=c.auth)
    assert r.status_code == 403 and f.job(job_id).status == "rendered", "signed for other frames: nothing re-queued"
    assert c.http.post(f"/api/jobs/{job_id}/reject", json=body, headers=c.auth).status_code == 409
    r = c.http.post(f"/api/jobs/{job_id}/reject", json={**body, "signature": c.sign(req["typed_data"])},
                    headers=c.auth)
    assert r.status_code == 200 and r.json()["requeued_tasks"] == 1
    f.settle()
    assert f.chain.escrow_job(int(f.st(job_id).escrow_job)).state == "disputed"
    assert [e.args["reason_hash"] for e in f.events("JobRejected", job_id)] == [req["reason_hash"]]


def test_a_silent_creator_is_settled_after_the_review_window(own):
    f, c = own
    job_id = funded_job(f, c)
    rendered(f, job_id)
    f.d.now += REVIEW_WINDOW_SECONDS + 1
    f.chain.advance_time(int(REVIEW_WINDOW_SECONDS) + 1)
    assert f.ledger.auto_approve(f.d.now) == [job_id]
    f.settle()
    f.settle()
    assert f.job(job_id).status == "paid" and len(f.txs("settle", job_id)) == 1
    assert f.events("JobApproved", job_id)[0].args["unreviewed"] is True
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(4000)


def test_a_deposit_with_a_short_deadline_does_not_start_the_job(own):
    f, c = own
    job_id = make_job(f.engine, f.blobs, f.alice, frames="1", hold_for_deposit=True)
    f.settle()
    terms = c.http.get(f"/api/jobs/{job_id}/deposit", headers=c.auth).json()
    c.send(terms["calls"][0])
    c.send({"to": terms["escrow"], "data": f.chain.escrow.encode_abi(
        "open_job", args=[int(terms["escrow_job"]), int(terms["amount"]), f.chain.timestamp() + 120])})
    f.settle()
    assert f.job(job_id).status == "funding" and "deadline" in f.st(job_id).error


def test_the_custodial_balance_moves_to_the_linked_wallet(own):
    f, c = own
    custodial = c.http.get("/api/wallet", headers=c.auth).json()["custodial_address"]
    f.chain.wait(f.chain.sign(f.chain.operator_key, f.chain.mint(custodial, 5 * T)))
    before = f.chain.token_balance(c.address)
    r = c.http.post("/api/wallet/move", headers=c.auth)
    assert r.status_code == 200 and r.json()["amount"] == str(5 * T), r.text
    assert f.chain.token_balance(c.address) - before == 5 * T and f.chain.token_balance(custodial) == 0
    assert c.http.post("/api/wallet/move", headers=c.auth).status_code == 409
