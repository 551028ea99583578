"""The contracts on a real EVM (eth-tester on py-evm, in process): RenderToken and JobEscrow.

Who may do what (only the operator posts, only the creator approves or rejects, refunds only after the
deadline and only unapproved), that nothing pays twice (approve, withdraw, a re-entrant token), and a
hypothesis property test over random jobs and actions: every token deposited is always either held for
an unsettled job, credited to someone, or withdrawn — never created, never lost.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.payments import chain as ch
from farm.payments.chain import TxRejected

T = 10**18
FEE_BPS = 250
REVIEW = 3600  # the escrow's review window in these tests
TESTS_CONTRACTS = Path(__file__).resolve().parents[1] / "contracts"


class Env:
    """A fresh chain with the token and escrow deployed; dev accounts: operator, creator, other, workers."""

    def __init__(self, token: str | None = None):
        self.c = ch.Chain.embedded_evm()
        self.keys = ["0x" + k.to_bytes().hex() for k in self.c.backend.account_keys]
        self.op, self.creator, self.other = self.keys[0], self.keys[1], self.keys[2]
        self.creator_addr, self.other_addr = ch.address_of(self.creator), ch.address_of(self.other)
        self.worker_keys = self.keys[3:6]
        self.workers = [ch.address_of(k) for k in self.worker_keys]
        self.dep = self.c.deploy(token, FEE_BPS, REVIEW)
        self.escrow = self.dep["escrow"]
        if token is None:
            for k in (self.creator, self.other):
                self.tx(self.op, "token", "mint", ch.address_of(k), 10_000 * T)
                self.tx(k, "token", "approve", self.escrow, 2**256 - 1)

    def call(self, contract: str, name: str, *args):
        """The contract function by its name: these tests exercise the contracts' whole ABI, also the
        functions (and misuses) the farm's typed wrapper in farm/payments/chain.py never calls."""
        return getattr((self.c.token if contract == "token" else self.c.escrow).functions, name)(*args)

    def tx(self, key: str, contract: str, name: str, *args):
        return self.c.wait(self.c.sign(key, self.call(contract, name, *args)))

    def fails(self, key: str, contract: str, name: str, *args, match: str | None = None):
        with pytest.raises(TxRejected, match=match):
            self.c.sign(key, self.call(contract, name, *args))

    def open(self, job: int, amount: int, key: str | None = None, deadline_in: int = 3600):
        return self.tx(key or self.creator, "escrow", "open_job", job, amount, self.c.timestamp() + deadline_in)

    def job(self, job: int) -> ch.EscrowJob:
        return self.c.escrow_job(job)

    def sig(self, key: str, job: int) -> bytes:
        j = self.job(job)
        return self.c.sign_approve(key, job, j.round, j.payouts_hash)


@pytest.fixture
def env():
    return Env()


def test_token_is_mintable_by_its_deployer_only(env):
    abi_names = {f["name"] for f in env.c.token.abi if f["type"] == "function"}
    assert {"transfer", "transferFrom", "approve", "permit", "mint"} <= abi_names
    assert not abi_names & {"set_minter", "transfer_ownership", "renounce_ownership"}, "the minter is fixed"
    env.fails(env.other, "token", "mint", env.other_addr, T, match="access is denied")
    env.tx(env.op, "token", "mint", env.workers[0], 5 * T)
    assert env.c.token_balance(env.workers[0]) == 5 * T
    assert env.c.token.functions.decimals().call() == 18


def test_only_the_operator_posts_payouts_and_never_above_the_deposit(env):
    env.open(1, 1000 * T)
    env.fails(env.creator, "escrow", "post_payouts", 1, [env.workers[0]], [10 * T], match="only the operator")
    env.fails(env.other, "escrow", "post_payouts", 1, [env.workers[0]], [10 * T], match="only the operator")
    budget = 1000 * T * 10_000 // (10_000 + FEE_BPS)  # payouts + fee (2.5 %) must fit in the deposit
    env.fails(env.op, "escrow", "post_payouts", 1, [env.workers[0], env.workers[1]], [budget, T],
              match="exceed the deposit")
    env.fails(env.op, "escrow", "post_payouts", 1, [env.workers[0]], [0], match="zero payout")
    env.fails(env.op, "escrow", "post_payouts", 2, [env.workers[0]], [T], match="job not open")
    env.tx(env.op, "escrow", "post_payouts", 1, [env.workers[0]], [budget])
    j = env.job(1)
    assert j.state == "posted" and j.payout_total + j.fee <= j.deposit and j.round == 1
    assert j.payouts_hash == ch.payouts_hash([env.workers[0]], [budget])


def test_only_the_creator_approves_directly_or_by_signature(env):
    env.open(1, 100 * T)
    ws, am = env.workers[:2], [10 * T, 20 * T]
    env.tx(env.op, "escrow", "post_payouts", 1, ws, am)
    env.fails(env.other, "escrow", "approve", 1, ws, am, match="only the creator")
    env.fails(env.op, "escrow", "approve", 1, ws, am, match="only the creator")
    env.fails(env.op, "escrow", "approve_by_sig", 1, ws, am, env.sig(env.other, 1), match="not signed by the creator")
    env.fails(env.op, "escrow", "approve_by_sig", 1, ws, am, env.sig(env.op, 1), match="not signed by the creator")
    env.fails(env.creator, "escrow", "approve", 1, ws, [10 * T, 21 * T], match="not the posted payout list")
    env.tx(env.op, "escrow", "approve_by_sig", 1, ws, am, env.sig(env.creator, 1))  # relayed by the operator
    assert env.job(1).state == "approved"
    # the creator's own transaction works too
    env.open(2, 50 * T)
    env.tx(env.op, "escrow", "post_payouts", 2, [ws[0]], [5 * T])
    env.tx(env.creator, "escrow", "approve", 2, [ws[0]], [5 * T])
    assert env.c.credit(ws[0]) == 15 * T


def test_approval_credits_exactly_once_and_everything_adds_up(env):
    env.open(7, 100 * T)
    ws, am = env.workers, [10 * T, 20 * T, 3 * T]
    env.tx(env.op, "escrow", "post_payouts", 7, ws, am)
    sig = env.sig(env.creator, 7)
    env.tx(env.op, "escrow", "approve_by_sig", 7, ws, am, sig)
    env.fails(env.op, "escrow", "approve_by_sig", 7, ws, am, sig, match="no payouts to approve")
    env.fails(env.creator, "escrow", "approve", 7, ws, am, match="no payouts to approve")
    env.fails(env.op, "escrow", "post_payouts", 7, ws, am, match="job not open")
    fee = 33 * T * FEE_BPS // 10_000
    assert [env.c.credit(w) for w in ws] == am
    assert env.c.credit(env.c.operator) == fee
    assert env.c.credit(env.creator_addr) == 100 * T - 33 * T - fee
    assert sum(env.c.credit(a) for a in [*ws, env.c.operator, env.creator_addr]) == 100 * T
    assert env.c.token_balance(env.escrow) == 100 * T
    names = [e.name for e in env.c.events(0, env.c.block_number())]
    assert names == ["JobOpened", "PayoutsPosted", "JobApproved"]


def test_withdraw_twice_pays_once(env):
    env.open(1, 100 * T)
    env.tx(env.op, "escrow", "post_payouts", 1, [env.workers[0]], [40 * T])
    env.tx(env.creator, "escrow", "approve", 1, [env.workers[0]], [40 * T])
    env.tx(env.worker_keys[0], "escrow", "withdraw")
    assert env.c.token_balance(env.workers[0]) == 40 * T and env.c.credit(env.workers[0]) == 0
    env.fails(env.worker_keys[0], "escrow", "withdraw", match="nothing to withdraw")
    env.fails(env.op, "escrow", "withdraw_for", env.workers[0], match="nothing to withdraw")
    assert env.c.token_balance(env.workers[0]) == 40 * T
    # withdraw_for pays the account itself, whoever calls it
    env.tx(env.other, "escrow", "withdraw_for", env.creator_addr)
    assert env.c.token_balance(env.other_addr) == 10_000 * T
    assert env.c.token_balance(env.escrow) == env.c.credit(env.c.operator)


def test_reject_opens_a_dispute_then_a_new_list_is_approved(env):
    env.open(3, 100 * T)
    ws = env.workers[:2]
    env.tx(env.op, "escrow", "post_payouts", 3, ws, [10 * T, 10 * T])
    old_sig = env.sig(env.creator, 3)
    env.fails(env.other, "escrow", "reject", 3, ch.text_hash("x"), match="only the creator")
    bad = env.c.sign_reject(env.other, 3, 1, ch.text_hash("frames 2"))
    env.fails(env.op, "escrow", "reject_by_sig", 3, ch.text_hash("frames 2"), bad, match="not signed by the creator")
    good = env.c.sign_reject(env.creator, 3, 1, ch.text_hash("frames 2"))
    env.tx(env.op, "escrow", "reject_by_sig", 3, ch.text_hash("frames 2"), good)
    assert env.job(3).state == "disputed"
    env.fails(env.creator, "escrow", "approve", 3, ws, [10 * T, 10 * T], match="no payouts to approve")
    env.tx(env.op, "escrow", "post_payouts", 3, ws, [10 * T, 12 * T])  # re-rendered by someone else
    assert env.job(3).round == 2
    env.fails(env.op, "escrow", "approve_by_sig", 3, ws, [10 * T, 12 * T], old_sig, match="not signed")
    env.tx(env.op, "escrow", "approve_by_sig", 3, ws, [10 * T, 12 * T], env.sig(env.creator, 3))
    assert [env.c.credit(w) for w in ws] == [10 * T, 12 * T]
    names = [e.name for e in env.c.events(0, env.c.block_number())]
    assert names == ["JobOpened", "PayoutsPosted", "JobRejected", "PayoutsPosted", "JobApproved"]


def test_refund_only_after_the_deadline_and_only_if_unapproved(env):
    env.open(1, 100 * T, deadline_in=600)
    env.open(2, 50 * T, deadline_in=600)
    env.tx(env.op, "escrow", "post_payouts", 2, [env.workers[0]], [5 * T])
    env.tx(env.creator, "escrow", "approve", 2, [env.workers[0]], [5 * T])
    env.fails(env.creator, "escrow", "refund", 1, match="deadline not reached")
    env.c.advance_time(601)
    env.fails(env.creator, "escrow", "refund", 2, match="not refundable")  # approved: stays paid
    env.tx(env.other, "escrow", "refund", 1)  # anyone may trigger it; the creator is credited
    assert env.job(1).state == "refunded"
    env.fails(env.creator, "escrow", "refund", 1, match="not refundable")
    env.fails(env.op, "escrow", "post_payouts", 1, [env.workers[0]], [T], match="job not open")
    before = env.c.token_balance(env.creator_addr)
    env.tx(env.creator, "escrow", "withdraw")
    assert env.c.token_balance(env.creator_addr) - before == 100 * T + (50 - 5) * T - 5 * T * FEE_BPS // 10_000


def test_a_silent_creator_is_settled_after_the_review_window_not_refunded(env):
    """A creator with their own wallet who neither approves nor disputes a posted list cannot wait for the
    deadline and take the deposit back: the operator settles it once the review window has passed, and
    the deadline's refund waits for the operator's turn (twice the window after a posting)."""
    env.open(5, 100 * T, deadline_in=60)
    ws, amounts = env.workers[:1], [20 * T]
    env.tx(env.op, "escrow", "post_payouts", 5, ws, amounts)
    env.fails(env.op, "escrow", "settle_unreviewed", 5, ws, amounts, match="review window is still open")
    env.c.advance_time(120)  # past the deadline, inside the review window
    env.fails(env.creator, "escrow", "refund", 5, match="under review")
    env.fails(env.creator, "escrow", "settle_unreviewed", 5, ws, amounts, match="only the operator")
    env.c.advance_time(REVIEW)
    env.fails(env.op, "escrow", "settle_unreviewed", 5, ws, [30 * T], match="not the posted payout list")
    env.tx(env.op, "escrow", "settle_unreviewed", 5, ws, amounts)
    assert env.job(5).state == "approved" and env.c.credit(ws[0]) == 20 * T
    ev = [e for e in env.c.events(0, env.c.block_number()) if e.name == "JobApproved"][-1]
    assert ev.args["unreviewed"] is True
    # had the operator done nothing, the creator gets the deposit back at last
    env.open(6, 10 * T, deadline_in=60)
    env.tx(env.op, "escrow", "post_payouts", 6, ws, [T])
    env.c.advance_time(2 * REVIEW + 1)
    env.tx(env.other, "escrow", "refund", 6)
    assert env.job(6).state == "refunded"


def test_disputes_are_bounded_and_a_dispute_does_not_escape_payment(env):
    """At most MAX_DISPUTES rejections per job: after them the posted list can only be approved or
    settled; a dispute made just before the deadline gives the operator REVIEW seconds to post again."""
    env.open(7, 100 * T, deadline_in=60)
    ws = env.workers[:1]
    for round_ in (1, 2):
        env.tx(env.op, "escrow", "post_payouts", 7, ws, [T])
        env.tx(env.creator, "escrow", "reject", 7, ch.text_hash(f"round {round_}"))
    env.c.advance_time(61)
    env.fails(env.creator, "escrow", "refund", 7, match="dispute is being answered")
    env.tx(env.op, "escrow", "post_payouts", 7, ws, [2 * T])
    env.fails(env.creator, "escrow", "reject", 7, ch.text_hash("again"), match="no disputes left")
    sig = env.c.sign_reject(env.creator, 7, env.job(7).round, ch.text_hash("again"))
    env.fails(env.op, "escrow", "reject_by_sig", 7, ch.text_hash("again"), sig, match="no disputes left")
    assert env.job(7).disputes == 2
    env.c.advance_time(REVIEW)
    env.tx(env.op, "escrow", "settle_unreviewed", 7, ws, [2 * T])
    assert env.c.credit(ws[0]) == 2 * T


def test_release_is_the_operators_early_refund(env):
    env.open(4, 30 * T)
    env.fails(env.creator, "escrow", "release", 4, match="only the operator")
    env.tx(env.op, "escrow", "release", 4)
    assert env.job(4).state == "refunded" and env.c.credit(env.creator_addr) == 30 * T


def test_deposits_are_checked(env):
    env.fails(env.creator, "escrow", "open_job", 1, 0, env.c.timestamp() + 60, match="empty deposit")
    env.fails(env.creator, "escrow", "open_job", 1, T, env.c.timestamp() - 1, match="deadline in the past")
    env.open(1, 10 * T)
    env.fails(env.other, "escrow", "open_job", 1, T, env.c.timestamp() + 60, match="already used")
    poor = env.worker_keys[0]  # holds no tokens
    env.tx(poor, "token", "approve", env.escrow, T)
    env.fails(poor, "escrow", "open_job", 9, T, env.c.timestamp() + 60)
    assert env.c.token_balance(env.escrow) == 10 * T


def test_a_reentrant_token_cannot_drain_the_escrow():
    env = Env(token=None)
    token, _ = env.c.deploy_contract("ReentrantToken", contracts_dir=TESTS_CONTRACTS)
    escrow, _ = env.c.deploy_contract("JobEscrow", token, env.c.operator, FEE_BPS, REVIEW)
    env.c.attach(token, escrow)
    bad = env.c.w3.eth.contract(address=token, abi=ch.compile_contract("ReentrantToken", TESTS_CONTRACTS)["abi"])

    def call(key, fn):
        env.c.wait(env.c.sign(key, fn))
    call(env.op, bad.functions.mint(env.creator_addr, 1000 * T))
    call(env.creator, bad.functions.approve(escrow, 1000 * T))
    env.open(1, 600 * T)
    attacker, victim = env.workers[0], env.workers[1]
    env.tx(env.op, "escrow", "post_payouts", 1, [attacker, victim], [100 * T, 300 * T])
    env.tx(env.creator, "escrow", "approve", 1, [attacker, victim], [100 * T, 300 * T])
    call(env.op, bad.functions.arm(escrow, True))
    env.tx(env.worker_keys[0], "escrow", "withdraw")
    assert bad.functions.attempts().call() == 1, "the token did call back into the escrow"
    assert bad.functions.reentered().call() is False, "the re-entrant withdrawal was refused"
    assert bad.functions.balanceOf(attacker).call() == 100 * T
    assert env.c.credit(attacker) == 0 and env.c.credit(victim) == 300 * T
    assert bad.functions.balanceOf(escrow).call() == 500 * T  # 600 - 100: the victim's share is intact
    env.tx(env.worker_keys[1], "escrow", "withdraw")
    assert bad.functions.balanceOf(victim).call() == 300 * T


# ------------------------------------------------------------------ property: tokens are conserved
JOBS, WORKERS = 3, 3  # jobs 1 and 2 are opened first; job 3 may be opened by a plan
ACCOUNT = st.integers(0, 1)  # which creator
MOSTLY = st.sampled_from([True, True, True, False])  # mostly the legitimate caller, sometimes not
RARELY = MOSTLY.map(lambda b: not b)
amounts = st.integers(0, 100).map(lambda n: n * T)
JOB = st.integers(1, JOBS)
_post = st.tuples(st.just("post"), JOB, MOSTLY,
                  st.lists(st.tuples(st.integers(0, WORKERS - 1), amounts), min_size=0, max_size=3))
_approve = st.tuples(st.just("approve"), JOB, st.sampled_from(["creator", "sig", "sig", "creator", "other", "badsig"]),
                     RARELY)
_withdraw = st.tuples(st.just("withdraw"), st.integers(0, WORKERS + 2), st.booleans())
# repeated alternatives are drawn more often, so that most plans reach approvals and withdrawals
actions = st.one_of(
    _post, _post, _approve, _approve, _approve, _withdraw, _withdraw,
    st.tuples(st.just("open"), st.just(3), ACCOUNT, st.integers(1, 400).map(lambda n: n * T)),
    st.tuples(st.just("reject"), JOB, MOSTLY),
    st.tuples(st.just("refund"), JOB),
    st.tuples(st.just("release"), JOB, RARELY),
    st.tuples(st.just("time"), st.integers(0, 2000)),
)


@pytest.fixture(scope="module")
def prop_env():
    return Env()


def _act(env: Env, posted: dict, a: tuple) -> None:
    creators = [env.creator, env.other]
    op = a[0]
    if op == "open":
        env.open(a[1], a[3], key=creators[a[2]], deadline_in=1000)
    elif op == "post":
        ws = [env.workers[w] for w, _ in a[3]]
        am = [x for _, x in a[3]]
        env.tx(env.op if a[2] else env.creator, "escrow", "post_payouts", a[1], ws, am)
        posted[a[1]] = (ws, am)
    elif op == "approve":
        ws, am = posted.get(a[1], ([], []))
        if a[3] and am:
            am = [am[0] + 1, *am[1:]]  # a tampered list
        creator = env.job(a[1]).creator
        key = next((k for k in creators if ch.address_of(k) == creator), env.creator)
        if a[2] in ("creator", "other"):
            env.tx(key if a[2] == "creator" else env.worker_keys[0], "escrow", "approve", a[1], ws, am)
        else:
            signer = key if a[2] == "sig" else env.worker_keys[1]
            env.tx(env.op, "escrow", "approve_by_sig", a[1], ws, am, env.sig(signer, a[1]))
    elif op == "reject":
        creator = env.job(a[1]).creator
        key = next((k for k in creators if ch.address_of(k) == creator), env.creator)
        env.tx(key if a[2] else env.worker_keys[2], "escrow", "reject", a[1], ch.text_hash("r"))
    elif op == "refund":
        env.tx(env.worker_keys[0], "escrow", "refund", a[1])
    elif op == "release":
        env.tx(env.op if a[2] else env.creator, "escrow", "release", a[1])
    elif op == "withdraw":
        everyone = [*env.worker_keys, env.op, env.creator, env.other]
        key = everyone[a[1] % len(everyone)]
        if a[2]:
            env.tx(env.op, "escrow", "withdraw_for", ch.address_of(key))
        else:
            env.tx(key, "escrow", "withdraw")
    elif op == "time":
        env.c.advance_time(a[1])


def _check(env: Env, since: int) -> None:
    """The escrow's conservation invariants, with events read from block ``since`` (the plan's first)."""
    c = env.c
    holders = [*env.workers, c.operator, env.creator_addr, env.other_addr]
    jobs = [c.escrow_job(j) for j in range(1, JOBS + 1)]
    held = sum(j.deposit for j in jobs if j.state in ("open", "posted", "disputed"))
    credits = sum(c.credit(a) for a in holders)
    assert c.token_balance(env.escrow) == held + credits, "the escrow holds exactly what it owes"
    events = c.events(since, c.block_number())
    deposited = sum(e.args["deposit"] for e in events if e.name == "JobOpened")
    withdrawn = sum(e.args["amount"] for e in events if e.name == "Withdrawn")
    assert deposited == held + credits + withdrawn, "deposits = held + credited + withdrawn"
    settled = [e.args["job_id"] for e in events if e.name in ("JobApproved", "JobRefunded")]
    assert len(settled) == len(set(settled)), "a deposit is paid out at most once"
    for j in jobs:
        if j.state in ("posted", "approved"):
            assert j.payout_total + j.fee <= j.deposit


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(ACCOUNT, st.integers(50, 400).map(lambda n: n * T)), min_size=2, max_size=2),
       st.lists(actions, min_size=4, max_size=20))
def test_property_every_token_is_held_credited_or_withdrawn(prop_env, deposits, plan):
    env, tester = prop_env, prop_env.c.w3.provider.ethereum_tester
    snap = tester.take_snapshot()
    since = env.c.block_number() + 1
    everyone = [*env.worker_keys, env.op, env.creator, env.other]
    try:
        posted: dict[int, tuple] = {}
        opens = [("open", job, who, amount) for job, (who, amount) in enumerate(deposits, 1)]
        cash_out = [("withdraw", i, False) for i in range(len(everyone))]  # at the end, everyone withdraws
        for a in opens + plan + cash_out:
            try:
                _act(env, posted, a)
            except TxRejected:
                continue  # refused in the pre-flight: it never reached the chain, nothing changed
            _check(env, since)
        assert all(env.c.credit(ch.address_of(k)) == 0 for k in everyone)
        assert sum(env.c.token_balance(ch.address_of(k)) for k in everyone) + env.c.token_balance(env.escrow) \
            == 20_000 * T, "no token was created or vanished"
    finally:
        tester.revert_to_snapshot(snap)


def test_compiled_artifacts_are_cached_by_source_hash(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Probe.vy").write_text("# pragma version ~=0.4.3\n"
                                  "@external\n@view\ndef answer() -> uint256:\n    return 42\n")
    first = ch.compile_contract("Probe", src, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("Probe-*.json"))) == 1
    assert ch.compile_contract("Probe", src, cache_dir=tmp_path / "cache") == first  # read back, not rebuilt
    (src / "Probe.vy").write_text((src / "Probe.vy").read_text().replace("42", "43"))
    second = ch.compile_contract("Probe", src, cache_dir=tmp_path / "cache")
    assert second["bytecode"] != first["bytecode"], "a changed source is compiled again, never a stale artifact"
    assert len(list((tmp_path / "cache").glob("Probe-*.json"))) == 2
