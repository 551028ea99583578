"""Properties of the exchange over random job histories (issue 17): whatever happens to a job — results
fast and slow, lies about seconds, lost leases, rejections, a coordinator restart, a cancel — the payout
list computed from the database pays each accepted task once, by its accepting attempt, never a rejected,
lost or superseded one; it fits in the deposit (payouts + fee + refund = deposit, refund ≥ 0); and what a
worker earns for a frame does not depend on the seconds it reports, nor grow with the time it really takes
while honest work sets the job's reference (the fastest third of the coordinator-timed renders).

A real coordinator driven by ``step`` over a real SQLite file, the real review code (bounds included), the
real pricing. Spot checks are off here (the frames are stand-in bytes); paid checks are tested with real
pictures in tests/verify/test_verification.py, the chain side in test_ledger.py and test_contracts.py."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import select

from common import protocol as P
from farm.kinds.jobs import JobError
from farm.payments import pricing as pr
from farm.store.db import session as new_session
from farm.store.models import Attempt, Job, Task
from farm.web import review
from tests.fixtures_inproc import Driver, make_engine_and_store, make_job, make_user, new_coordinator, of, output_blob

FRAMES = 6
HONEST, PADDER = b"h", b"p"
OPS = st.sampled_from(["h", "h", "p", "p", "lose_h", "lose_p", "reject", "restart", "cancel"])
PRICING = pr.Pricing(price_per_unit=pr.to_wei("0.01"), fee_bps=250)
DEPOSIT = pr.to_wei("1000")


class History:
    """One job's life, replayed from ``ops``: ``delay`` is each worker's real seconds a frame (the
    coordinator's clock), ``claim`` the seconds it reports."""

    def __init__(self, root: Path, ops: list[str], delay: dict[bytes, float], claim: dict[bytes, float]):
        self.engine, self.blobs = make_engine_and_store(root)
        self.user, _ = make_user(self.engine, "alice")
        self.d = Driver(new_coordinator(self.engine, self.blobs))
        self.delay, self.claim = delay, claim
        self.job = make_job(self.engine, self.blobs, self.user, frames=f"1-{FRAMES}")
        self.canceled = False
        for w in (HONEST, PADDER):
            self.d.hello(w)
        for op in ops:
            if self.canceled:
                break
            getattr(self, "op_" + op.split("_")[0])(*(op.split("_")[1:]))
        for _ in range(4 * FRAMES):  # the honest worker finishes what is left
            if self.canceled or self.status() == "rendered":
                break
            self.op_h()

    def status(self) -> str:
        with new_session(self.engine) as s:
            return s.get(Job, self.job).status

    def _alive(self, but: bytes):
        return [(w, P.Heartbeat([])) for w in (HONEST, PADDER) if w != but and w in self.d.coord.conns]

    def _render(self, w: bytes) -> None:
        leased = of(self.d.send((w, P.Ready(1))), P.Task, w)
        if leased:
            t = leased[0]
            outs = [output_blob(self.blobs, f, f"{w!r}{t.task_id}.{t.attempt}") for f in t.spec["frames"]]
            self.d.send((w, P.Result(t.task_id, t.attempt, outs, self.claim[w])), *self._alive(w), dt=self.delay[w])

    def op_h(self) -> None:
        self._render(HONEST)

    def op_p(self) -> None:
        self._render(PADDER)

    def op_lose(self, who: str) -> None:
        w = HONEST if who == "h" else PADDER
        if of(self.d.send((w, P.Ready(1))), P.Task, w):  # takes a task, then leaves without a result
            self.d.send((w, P.Bye("crashed")), *self._alive(w), dt=1.0)
            self.d.hello(w)

    def op_reject(self) -> None:
        if self.status() == "rendered":
            try:
                review.reject_job(self.engine, self.job, self.user, [1 + self.job % FRAMES], "wrong",
                                  now=self.d.now)
            except JobError:
                pass  # past the bounds: refused, nothing written (test_reject_bounds.py)

    def op_restart(self) -> None:  # a new coordinator on the same database; the workers reconnect
        self.d.coord = new_coordinator(self.engine, self.blobs)
        for w in (HONEST, PADDER):
            self.d.hello(w)

    def op_cancel(self) -> None:
        self.d.coord.cancel_job(self.job, self.user)
        self.canceled = True

    def shares(self) -> dict[str, pr.Share]:
        with new_session(self.engine) as s:
            out, capped = pr.shares(s, PRICING, self.job, DEPOSIT)
        assert not capped
        return {x.worker_id: x for x in out}


def check_invariants(h: History) -> None:
    shares = h.shares()
    with new_session(h.engine) as s:
        tasks = s.exec(select(Task).where(Task.job_id == h.job).where(Task.check_id.is_(None))).all()
        attempts = s.exec(select(Attempt).where(Attempt.job_id == h.job)).all()
    accepted = [t for t in tasks if t.status == "accepted"]
    by_key = {(a.task_id, a.attempt): a for a in attempts}
    paying = [by_key[(t.id, t.attempt)] for t in accepted]
    # each accepted task is paid once, by its accepting attempt, which delivered (outcome done)
    assert all(a.outcome == "done" for a in paying), [a.outcome for a in paying]
    assert sum(x.tasks for x in shares.values()) == len(accepted)
    for wid, x in shares.items():
        assert x.tasks == sum(a.worker_id == wid for a in paying)
    # rejected, lost, canceled attempts are never the paying ones
    never = {(a.task_id, a.attempt) for a in attempts if a.outcome in ("rejected", "lost", "canceled", "failed")}
    assert not never & {(a.task_id, a.attempt) for a in paying}
    # tokens are conserved: payouts + fee + refund = deposit, and nothing is owed beyond the deposit
    payouts = sum(x.amount for x in shares.values())
    fee = PRICING.fee(payouts)
    refund = DEPOSIT - payouts - fee
    assert refund >= 0 and payouts + fee + refund == DEPOSIT
    # the same frame is worth the same to every worker (units × the job's reference): per-task pay is equal
    per_task = {x.amount // x.tasks for x in shares.values() if x.tasks}
    assert len(per_task) <= 1, shares


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, max_size=14), pad=st.sampled_from([1.0, 2.0, 4.0]),
       claim=st.sampled_from([0.01, 1.0, 1e6]))
def test_random_histories_pay_each_accepted_task_once_within_the_deposit(ops, pad, claim):
    with tempfile.TemporaryDirectory() as root:
        base = History(Path(root) / "a", ops, {HONEST: 0.5, PADDER: pad}, {HONEST: 0.5, PADDER: claim})
        check_invariants(base)
        # the seconds a worker reports change nothing (a statistic only)
        lied = History(Path(root) / "b", ops, {HONEST: 0.5, PADDER: pad}, {HONEST: 0.5, PADDER: claim * 1000 + 7})
        assert lied.shares() == base.shares()
        # padding more does not pay more a frame while honest work sets the reference (the fastest third:
        # the honest worker rendered at least half as many tasks as the padder)
        slower = History(Path(root) / "c", ops, {HONEST: 0.5, PADDER: pad * 3}, {HONEST: 0.5, PADDER: claim})
        check_invariants(slower)
        b, s_ = base.shares(), slower.shares()
        if all(x.get("h") and x.get("p") and 2 * x["h"].tasks >= x["p"].tasks for x in (b, s_)):
            assert s_["p"].amount // s_["p"].tasks <= b["p"].amount // b["p"].tasks
            assert s_["p"].amount // s_["p"].tasks == s_["h"].amount // s_["h"].tasks
