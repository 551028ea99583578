"""The embedded EVM's one-run gas estimate (farm/payments/evm_gas.py) against py-evm's exact search, and its
direct view calls (``Chain._view``) against web3's contract calls.

A whole settlement — fund, mint, allow, open, post payouts to many wallets, approve by signature,
withdraw — runs on the embedded chain while every estimate is also made by py-evm's exact binary search
on the same state. Each one-run estimate must be at least the exact least gas (or the transaction could
run out of gas) and close to it (or it buys nothing), and a call that reverts must still be refused at
signing time with the contract's reason.
"""
from __future__ import annotations

import pytest
from eth_utils import to_checksum_address
from eth.estimators.gas import binary_gas_search_exact

from farm.payments import chain as ch
from farm.payments import evm_gas
from farm.web import review
from tests.payments.test_ledger import Farm, rendered_job, wallet_of


@pytest.fixture
def paired(monkeypatch):
    """Every estimate made twice, one-run and exact, on the same state; the one-run result is used."""
    pairs: list[tuple[int, int]] = []
    one_run = evm_gas.one_run

    def both(state, tx):
        fast = one_run(state, tx)
        pairs.append((fast, binary_gas_search_exact(state, tx)))
        return fast

    monkeypatch.setattr(evm_gas, "one_run", both)
    return pairs


def test_one_run_estimates_cover_the_exact_need_of_a_whole_settlement(tmp_path, paired):
    f = Farm(tmp_path / "farm")
    six = tuple((f"w{i}".encode(), 1, 2.0 + i / 10) for i in range(6))  # payouts to 6 wallets: a loop
    job_id = rendered_job(f, frames="1-6", split=six)
    review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    f.settle()
    assert f.job(job_id).status == "paid"
    f.ledger.withdraw_for(wallet_of("w3"))
    kinds = {t.kind for t in f.txs("open") + f.txs("post") + f.txs("approve") + f.txs("allow")}
    assert kinds == {"allow", "open", "post", "approve"}
    assert len(paired) >= 5
    for fast, exact in paired:
        assert fast >= exact, f"one run estimated {fast}, the transaction needs {exact}"
        assert fast <= exact * 1.10 + 1000, f"one run estimated {fast}, far above the {exact} needed"


def test_a_call_that_would_revert_is_refused_at_signing_with_its_reason(tmp_path):
    f = Farm(tmp_path / "farm")
    chain = f.ledger.ensure_ready()
    stranger = ch.new_key()  # gas money, but no tokens and no allowance
    chain.wait(chain.sign(chain.operator_key, to=ch.address_of(stranger), value=10**18))
    with pytest.raises(ch.TxRejected) as err:  # no tokens, no allowance: open_job's transferFrom fails
        chain.sign(stranger, chain.open_job(12345, 10**18, chain.timestamp() + 3600))
    assert "allowance" in str(err.value), "the contract's own reason"
    assert chain.escrow_job(12345).state == ch.EscrowState.none, "nothing was sent"


@pytest.fixture
def paired_views(monkeypatch):
    """Every view the ledger reads made twice, straight to eth-tester and through web3's contract call."""
    pairs: list[tuple[str, object, object]] = []
    direct = ch.Chain._view

    def both(self, contract, fn, *args):
        fast = direct(self, contract, fn, *args)
        pairs.append((fn, fast, contract.functions[fn](*args).call()))
        return fast

    monkeypatch.setattr(ch.Chain, "_view", both)
    return pairs


def test_direct_views_read_what_web3_reads_through_a_whole_settlement(tmp_path, paired_views):
    f = Farm(tmp_path / "farm")
    job_id = rendered_job(f, frames="1-2")
    review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    f.settle()
    assert f.job(job_id).status == "paid"
    chain = f.ledger.ensure_ready()
    w1 = wallet_of("w1")
    assert chain.credit(w1) > 0
    assert chain.escrow_job(987654321).state == ch.EscrowState.none  # a job never opened: zeros
    for fn, fast, web3_value in paired_views:
        assert fast == web3_value, f"{fn}: direct {fast!r}, web3 {web3_value!r}"
    seen = {fn for fn, *_ in paired_views}
    assert {"balanceOf", "allowance", "jobs", "credit"} <= seen, seen
    opened = [fast for fn, fast, _ in paired_views if fn == "jobs" and fast[0] != "0x" + "0" * 40]
    assert opened and all(j[0] == to_checksum_address(j[0]) for j in opened), "the creator checksummed, as web3 does"
