"""Settlement of jobs on chain: deposits, payout lists, approvals, disputes, refunds, withdrawals.

The :class:`Ledger` drives every job's escrow towards what the database says (level-triggered, like a
controller): a started job gets a deposit from its creator's wallet, a rendered job gets its payout list
posted, an approved job gets the creator's approval relayed, a rejected job gets its dispute recorded, a
canceled job pays the work it had accepted (its list posted and approved: cancelling approves that work)
and gets the rest back, and a failed job, or a canceled one with no accepted work, gets its deposit
released; a job left rendered past the review window is approved (:meth:`Ledger.auto_approve`). Each :meth:`Ledger.sync` reads the escrow's state of
each unsettled job and sends at most the one transaction that moves it on. :class:`farm.payments.settler.Settler` runs it
as an asyncio background task of ``farm serve``, and moves approved jobs to ``paid`` on the coordinator's
thread. Transactions go through :class:`farm.payments.txs.TxJournal`; custodial creator keys are
:class:`farm.payments.custody.Custody`'s.

Invariants:

* the chain is the truth: what to do next is decided from the escrow's state, never from what the DB
  believes it sent, so a lost receipt or a crash just means the next pass sees the step done;
* a transaction is persisted (signed bytes) before it is broadcast and re-broadcast, never re-signed,
  while unresolved; no new transaction is signed while one is unresolved (one nonce at a time);
* the escrow refuses a second deposit, a second approval and payouts above the deposit, so even a
  duplicated action cannot pay twice (defence in depth);
* a node that is down raises :class:`~farm.payments.chain.ChainUnavailable`: nothing changes, the settler retries
  with backoff; :meth:`Ledger.reconcile` compares DB and chain when the chain (re)connects.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from sqlmodel import Session, select

from farm.payments import chain as ch
from farm.payments import pricing as pr
from farm.payments.chain import EscrowState
from farm.payments.custody import Custody
from farm.payments.txs import UNRESOLVED, TxJournal
from farm.store.db import session as new_session
from farm.store.ledger_models import (
    SETTLEMENT_FINAL,
    ChainEvent,
    ChainMeta,
    ChainTx,
    CreatorWallet,
    Payout,
    PayoutStatus,
    Settlement,
    SettlementStatus,
    TxStatus,
)
from farm.store.models import Job
from farm.store.states import JobStatus, transition

log = logging.getLogger("farm.payments.ledger")

FINAL = SETTLEMENT_FINAL
STARTED = tuple(s.value for s in (JobStatus.funding, JobStatus.queued, JobStatus.active, JobStatus.paused, JobStatus.rendered,
                                  JobStatus.rejected, JobStatus.approved))
ENDED = (JobStatus.canceled.value, JobStatus.failed.value)
EVENT_RANGE = 2000      # blocks per eth_getLogs
STEPS_PER_JOB = 8       # transactions one job may advance by in one pass (automining chains answer at once)
WAITING = (SettlementStatus.open, SettlementStatus.posted, SettlementStatus.disputed)  # on the chain, still rendering
RENDERING = tuple(s.value for s in (JobStatus.funding, JobStatus.queued, JobStatus.active, JobStatus.paused, JobStatus.rejected))
REVIEW_WINDOW_SECONDS = float(os.environ.get("RENDERHIVE_REVIEW_WINDOW", 72 * 3600))
"""Seconds a rendered job waits for its creator's approval or rejection before it is approved (and paid)."""
MAX_DISPUTES = 2  # the escrow's MAX_DISPUTES
DEADLINE_SLACK = 0.9  # a creator's own deposit must keep this share of the deadline the farm asks for
RECHECK_SECONDS = 30.0  # how often a job that is still rendering has its escrow looked at anyway


class LedgerError(RuntimeError):
    """A payment request that cannot be honoured; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class ChainConfigError(ValueError):
    """``--chain-rpc`` / ``--chain-key-file`` cannot work; the message says what to change."""


def chain_factory(rpc: str | None = None, key_file: str | None = None) -> Callable[[], ch.Chain] | None:
    """How to reach the chain: ``embedded`` (default), ``off``, or a JSON-RPC URL with an operator key."""
    rpc = rpc or os.environ.get("RENDERHIVE_CHAIN_RPC") or os.environ.get("CHAIN_RPC_URL") or "embedded"
    if rpc == "off":
        return None
    if rpc == "embedded":
        return ch.Chain.embedded_evm
    key_file = key_file or os.environ.get("RENDERHIVE_CHAIN_KEY_FILE")
    if not key_file:
        raise ChainConfigError(f"--chain-rpc {rpc} needs --chain-key-file: a file holding the operator's private "
                               "key (hex), whose account pays gas and posts payouts")
    try:
        key = ch.read_key_file(key_file)
    except (OSError, ValueError) as exc:
        raise ChainConfigError(f"--chain-key-file: {exc}") from None
    return lambda: ch.Chain.connect(rpc, key)


class Ledger:
    def __init__(self, engine, data_dir: Path, factory: Callable[[], ch.Chain],
                 pricing: pr.Pricing | None = None, token_address: str | None = None, tx_wait: float = 5.0,
                 clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock  # the coordinator's clock: job times (the review window) are measured by it
        self.data_dir = Path(data_dir)
        self.factory = factory
        self.pricing = pricing or pr.Pricing.from_env()
        self.token_address = token_address or os.environ.get("RENDERHIVE_TOKEN_ADDRESS") or None
        self.chain: ch.Chain | None = None
        self.deployment: dict[str, Any] = {}
        self.namespace = ""
        self.custody = Custody(self.data_dir)  # custodial creator keys, and whose key signs for an escrow
        self.txs = TxJournal(engine, tx_wait)  # signed before sent, one at a time
        self.tx_lock = self.txs.lock
        self.report: dict[str, Any] = {}
        self.wake_hook: Callable[[], None] | None = None  # set by the Settler: run a pass soon
        # set by the Settler: a job's deposit was just confirmed (called from the pass's thread, at once, so
        # that the job is queued without waiting for the rest of the pass: other jobs' payouts, the scan)
        self.funded_hook: Callable[[int], None] | None = None
        self._looked: dict[int, float] = {}  # job id → when its escrow was last read (monotonic)
        self._event_mark = 0  # newest ChainEvent row seen by _due

    # ------------------------------------------------------------------ setup and reconciliation
    def _meta(self, s: Session, key: str, default: str = "") -> str:
        row = s.get(ChainMeta, key)
        return row.value if row else default

    def _set_meta(self, s: Session, key: str, value: str) -> None:
        s.merge(ChainMeta(key=key, value=value))

    def ensure_ready(self) -> ch.Chain:
        """Connect, deploy or attach the contracts, reconcile. Raises ChainUnavailable while the node is down."""
        if self.chain is not None:
            return self.chain
        chain = self.factory()
        genesis, chain_id = chain.genesis_hash(), chain.chain_id()
        with new_session(self.engine) as s:
            self.namespace = self._meta(s, "namespace") or secrets.token_hex(8)
            self._set_meta(s, "namespace", self.namespace)
            dep = json.loads(self._meta(s, "deployment", "{}"))
            if (dep and dep.get("genesis") == genesis and dep.get("chain_id") == chain_id
                    and chain.has_code(dep["escrow"]) and chain.has_code(dep["token"])
                    and self._terms_match(chain, dep)):
                pass  # attached by _terms_match
            else:
                reset = bool(dep)
                if reset:
                    log.warning("the chain has no escrow of ours at %s (a fresh chain, or the embedded one after a "
                                "restart): deploying again; unsettled jobs will deposit again", dep.get("escrow"))
                dep = {**chain.deploy(self.token_address, self.pricing.fee_bps, max(1, int(REVIEW_WINDOW_SECONDS))),
                       "genesis": genesis,
                       "chain_id": chain_id, "epoch": int(dep.get("epoch", 0)) + 1}
                self._set_meta(s, "deployment", json.dumps(dep))
                self._set_meta(s, "event_block", str(dep["deploy_block"]))
                if reset:
                    self._forget_old_chain(s, dep["epoch"])
                log.info("deployed escrow %s for token %s on chain %d", dep["escrow"], dep["token"], chain_id)
            s.commit()
        self.deployment, self.chain = dep, chain
        self.reconcile()
        return chain

    @staticmethod
    def _terms_match(chain: ch.Chain, dep: dict[str, Any]) -> bool:
        """Attach the recorded escrow if its code holds the recorded token and our operator (a deposit is
        only a deposit in the job's token, in an escrow that our operator settles) and has a review window
        (older escrows had none: a silent creator could keep the work for free)."""
        chain.attach(dep["token"], dep["escrow"])
        token, operator, review = chain.escrow_terms()
        if token.lower() == dep["token"].lower() and operator.lower() == chain.operator.lower() and review > 0:
            dep["review_seconds"] = review
            return True
        log.warning("the escrow at %s holds token %s and operator %s, not %s and %s: deploying our own",
                    dep["escrow"], token, operator, dep["token"], chain.operator)
        return False

    @property
    def epoch(self) -> int:
        return int(self.deployment.get("epoch", 0))

    def _forget_old_chain(self, s: Session, epoch: int) -> None:
        """After a chain reset, unsettled jobs start their escrow again; paid ones stay paid (history)."""
        for tx in s.exec(select(ChainTx).where(ChainTx.status.in_(UNRESOLVED))):
            tx.status, tx.error = TxStatus.dropped.value, "the chain was reset"
            s.add(tx)
        for st in s.exec(select(Settlement).where(Settlement.status.notin_(FINAL))):
            st.status, st.round, st.needs_payouts = SettlementStatus.new.value, 0, True
            st.reject_pending, st.epoch = False, epoch
            st.error = "the chain was reset: depositing again"
            s.add(st)
        for w in s.exec(select(CreatorWallet)):
            w.funded_at = None
            s.add(w)

    def reconcile(self) -> dict[str, Any]:
        """Compare the DB with the chain: resolve unfinished transactions, read missed events, and check
        each recent settlement against the escrow (adopting the chain's state where the DB is behind)."""
        chain = self.ensure_ready()
        report: dict[str, Any] = {"checked": 0, "adopted": [], "mismatch": []}
        with self.tx_lock:
            report["unresolved"] = self.txs.resolve_pending(self.chain)
        self._scan_events()
        expect = {  # the escrow's state that each settlement status stands for
            SettlementStatus.new: EscrowState.none, SettlementStatus.funding: EscrowState.none,
            SettlementStatus.open: EscrowState.open, SettlementStatus.posted: EscrowState.posted,
            SettlementStatus.disputed: EscrowState.disputed, SettlementStatus.approved: EscrowState.approved,
            SettlementStatus.paid: EscrowState.approved, SettlementStatus.refunded: EscrowState.refunded,
            SettlementStatus.released: EscrowState.refunded}
        with new_session(self.engine) as s:
            rows = s.exec(select(Settlement).where(Settlement.epoch == self.epoch)
                          .order_by(Settlement.job_id.desc()).limit(500)).all()
            for st in rows:
                state = chain.escrow_job(int(st.escrow_job)).state
                report["checked"] += 1
                released = st.status == SettlementStatus.released and state == EscrowState.none
                if expect.get(st.status) == state or released:
                    continue
                if st.status in FINAL:
                    report["mismatch"].append((st.job_id, st.status, state))
                    log.error("job %d is %s in the database but %s on chain: check the escrow by hand",
                              st.job_id, st.status, state)
                else:
                    report["adopted"].append((st.job_id, st.status, state))
        if report["adopted"]:
            log.info("reconcile: the chain is ahead of the database for jobs %s; settling continues from there",
                     [j for j, _, _ in report["adopted"]])
        self.report = report
        return report

    # ------------------------------------------------------------------ transactions (farm/payments/txs.py)
    def send(self, s: Session, job_id: int | None, kind: str, key: str, call=None, *, to: str | None = None,
             value: int = 0, detail: str = "") -> ChainTx:
        """Sign, persist, broadcast, and briefly wait for the receipt of one transaction."""
        return self.txs.send(self.chain, self.epoch, s, job_id, kind, key, call, to=to, value=value, detail=detail)

    @property
    def seam(self) -> Callable[[str, str], None] | None:
        """Test seam: called as seam(kind, stage) after a transaction is "signed" and "sent"."""
        return self.txs.seam

    @seam.setter
    def seam(self, fn: Callable[[str, str], None] | None) -> None:
        self.txs.seam = fn

    def _scan_events(self) -> int:
        """Mirror the escrow's events into ChainEvent rows (idempotent, from a persisted cursor)."""
        chain, added = self.chain, 0
        head = chain.block_number()
        with new_session(self.engine) as s:
            cur = int(self._meta(s, "event_block", str(self.deployment.get("deploy_block", 0))))
            keys = {st.escrow_job: st.job_id for st in s.exec(select(Settlement).where(Settlement.epoch == self.epoch))}
            while cur <= head:
                to = min(head, cur + EVENT_RANGE - 1)
                for ev in chain.events(cur, to):
                    if s.exec(select(ChainEvent.id).where(ChainEvent.epoch == self.epoch)
                              .where(ChainEvent.tx_hash == ev.tx_hash).where(ChainEvent.log_index == ev.log_index)
                              ).first():
                        continue
                    key = str(ev.args.get("job_id", ""))
                    args = {k: (str(v) if isinstance(v, int) and abs(v) > 2**53 else v) for k, v in ev.args.items()}
                    s.add(ChainEvent(epoch=self.epoch, escrow=chain.escrow.address, block=ev.block, tx_hash=ev.tx_hash,
                                     log_index=ev.log_index, name=ev.name, escrow_job=key, job_id=keys.get(key),
                                     args=json.loads(json.dumps(args, default=str))))
                    added += 1
                cur = to + 1
                self._set_meta(s, "event_block", str(cur))
                s.commit()
        return added

    # ------------------------------------------------------------------ the settlement loop
    def sync(self, scan_after: bool = True) -> None:
        """One pass over every unsettled job (see the module docstring). ``scan_after=False`` leaves the
        closing scan of the escrow's events to the caller (:class:`farm.payments.settler.Settler` moves a
        funded job to ``queued`` first: the scan is not needed for that, and it is on the job's path to its
        first lease)."""
        self.ensure_ready()
        self.auto_approve()
        with self.tx_lock:
            if self.txs.resolve_pending(self.chain):
                return  # a transaction is still in flight: its effect decides what comes next
            self._open_settlements()
            self._scan_events()
            for job_id in self._due():
                for _ in range(STEPS_PER_JOB):
                    try:
                        if not self._advance(job_id):
                            break
                    except ch.TxRejected as exc:
                        self._note_error(job_id, str(exc))
                        break
                    if self.txs.resolve_pending(self.chain):
                        return
        if scan_after:
            self._scan_events()

    def scan_events(self) -> int:
        """Mirror the escrow's new events into ChainEvent rows now (the scan that closes :meth:`sync`)."""
        self.ensure_ready()
        return self._scan_events()

    def auto_approve(self, now: float | None = None) -> list[int]:
        """Approve every job left rendered, neither approved nor rejected, for longer than the review window
        (REVIEW_WINDOW_SECONDS; Render Network's is 72 h): silence must not leave its workers unpaid. The
        creator was shown the previews all along; the approval is an ordinary one, recorded as automatic.
        Returns the jobs approved."""
        now = self.clock() if now is None else now
        window = REVIEW_WINDOW_SECONDS
        done = []
        with new_session(self.engine) as s:
            for job in s.exec(select(Job).where(Job.status == JobStatus.rendered.value)
                              .where(Job.updated_at < now - window).limit(500)).all():
                transition(s, job, JobStatus.approved, now=now,
                           reason=f"approved automatically: not reviewed within {window / 3600:g} h of rendering")
                done.append(job.id)
            s.commit()
        if done:
            log.info("jobs %s approved at the end of their review window", done)
        return done

    def _due(self) -> list[int]:
        """Unsettled jobs to look at now: those where the DB asks for a step, those with new escrow events
        (a creator's own refund or approval), and every other one once per RECHECK_SECONDS (a job still
        rendering has nothing to settle); those waiting for their deposit first, then by job."""
        now, due = time.monotonic(), []
        with new_session(self.engine) as s:
            mark = self._event_mark
            for ev_id, job_id in s.exec(select(ChainEvent.id, ChainEvent.job_id).where(ChainEvent.id > mark)).all():
                self._event_mark = max(self._event_mark, ev_id)
                if job_id is not None:
                    self._looked.pop(job_id, None)
            for st, status in s.exec(select(Settlement, Job.status).join(Job, Job.id == Settlement.job_id)
                                     .where(Settlement.status.notin_(FINAL)).order_by(Settlement.job_id)).all():
                idle = (status in RENDERING and st.status in WAITING and not st.reject_pending and not st.error)
                if not idle or now - self._looked.get(st.job_id, -RECHECK_SECONDS) >= RECHECK_SECONDS:
                    self._looked[st.job_id] = now
                    due.append((st.status not in (SettlementStatus.new, SettlementStatus.funding), st.job_id))
        # deposits first: a job waiting for its deposit has a worker waiting for it; payouts can wait a moment
        return [job_id for _, job_id in sorted(due)]

    def _note_error(self, job_id: int, error: str) -> None:
        with new_session(self.engine) as s:
            st = s.get(Settlement, job_id)
            if st and st.error != error[:2000]:
                log.warning("job %d: settlement step refused: %s", job_id, error)
                st.error, st.updated_at = error[:2000], time.time()
                s.add(st)
                s.commit()

    def _open_settlements(self) -> None:
        """A Settlement (with the estimate and the deposit to take) for every started job lacking one."""
        with new_session(self.engine) as s:
            have = select(Settlement.job_id)
            for job in s.exec(select(Job).where(Job.status.in_(STARTED)).where(Job.id.notin_(have))).all():
                est = pr.estimate_job(s, self.pricing, job)
                s.add(Settlement(job_id=job.id, epoch=self.epoch, escrow_job=str(ch.job_key(self.namespace, job.id)),
                                 estimate=est["cost"], deposit=est["deposit"]))
            s.commit()

    def _advance(self, job_id: int) -> bool:
        """Move one job's escrow one step towards the job's state; True when a transaction was sent."""
        chain = self.chain
        with new_session(self.engine) as s:
            st, job = s.get(Settlement, job_id), s.get(Job, job_id)
            ej = chain.escrow_job(int(st.escrow_job))
            if ej.state == EscrowState.approved:
                self._credited(s, st, ej)
                return False
            if ej.state == EscrowState.refunded:
                st.status = (SettlementStatus.released if job.status in ENDED else SettlementStatus.refunded).value
                if job.status == JobStatus.approved.value:
                    st.error = "the deposit was refunded (deadline passed) before the approval was settled"
                s.add(st)
                s.commit()
                return False
            # a canceled job pays for the work it had accepted: cancelling is approving that work, and only
            # the rest of the deposit goes back (a rendered job cannot be cancelled for free)
            pays_done_work = job.status == JobStatus.canceled.value and bool(pr.accepted_work(s, job_id))
            if job.status in ENDED and not pays_done_work:
                if ej.state == EscrowState.none:
                    st.status = SettlementStatus.released.value
                    s.add(st)
                    s.commit()
                    return False
                self.send(s, job_id, "release", chain.operator_key, chain.release(int(st.escrow_job)))
                return True
            if ej.state == EscrowState.none:
                return self._deposit(s, st, job)
            problem = self._escrow_problem(s, st, job, ej)
            if problem:  # nothing is leased, approved or released against an escrow that is not this job's
                if ej.creator.lower() != st.creator.lower() and st.status in (SettlementStatus.new,
                                                                            SettlementStatus.funding):
                    # someone else opened this escrow id first (a front-run open_job): deposit under a new one
                    st.escrow_job = str(ch.job_key(self.namespace, f"{job.id}:{st.escrow_job}"))
                    st.status = SettlementStatus.new.value
                st.error, st.updated_at = problem[:2000], time.time()
                s.add(st)
                s.commit()
                log.warning("job %d: %s", job_id, problem)
                return False
            newly_funded = st.status in (SettlementStatus.new, SettlementStatus.funding) and job.status == \
                JobStatus.funding.value
            if st.status in (SettlementStatus.new, SettlementStatus.funding):
                st.status, st.deadline, st.error = ej.state, ej.deadline, ""
            if st.reject_pending:
                if ej.state in (EscrowState.open, EscrowState.posted) and ej.disputes < MAX_DISPUTES:
                    reason = ch.text_hash(st.reject_reason)
                    sig = self.custody.creator_sig(self.chain, s, st, "reject", ej, reason)
                    if sig is not None:
                        self.send(s, job_id, "reject", chain.operator_key,
                                   chain.reject_by_sig(int(st.escrow_job), reason, sig))
                        return True
                st.reject_pending, st.reject_sig = False, ""
            if job.status in (JobStatus.rendered.value, JobStatus.approved.value) or pays_done_work:
                if st.needs_payouts:
                    self._compute(s, st, job, ej.deposit)
                if ej.state in (EscrowState.open, EscrowState.disputed) or ej.payouts_hash != st.payouts_hash:
                    wallets, amounts = self._current_list(s, st)
                    self.send(s, job_id, "post", chain.operator_key,
                               chain.post_payouts(int(st.escrow_job), wallets, amounts),
                               detail=f"round {st.payout_round}: {len(wallets)} wallets")
                    return True
                if job.status == JobStatus.approved.value or pays_done_work:
                    wallets, amounts = self._current_list(s, st)
                    sig = self.custody.creator_sig(self.chain, s, st, "approve", ej, ej.payouts_hash)
                    if sig is not None:
                        self.send(s, job_id, "approve", chain.operator_key,
                                   chain.approve_by_sig(int(st.escrow_job), wallets, amounts, sig))
                        return True
                    if chain.timestamp() >= ej.changed_at + self.review_seconds:
                        # a creator's own wallet that neither signed nor disputed within the review window
                        self.send(s, job_id, "settle", chain.operator_key,
                                   chain.settle_unreviewed(int(st.escrow_job), wallets, amounts),
                                   detail=f"unreviewed for {self.review_seconds} s: settled by the operator")
                        return True
            if st.status != ej.state:
                st.status = ej.state
            st.updated_at = time.time()
            s.add(st)
            s.commit()
            if newly_funded and self.funded_hook:
                self.funded_hook(job_id)
            return False

    def _escrow_problem(self, s: Session, st: Settlement, job: Job, ej: ch.EscrowJob) -> str:
        """Why the escrow under this job's id is not its deposit ("" when it is): it must come from the
        job's creator's wallet and hold at least the deposit the job's quote asked for (the token is the
        escrow's own, checked when the ledger attached it). Checked before the job is leased, and at every
        step after, so approval and release never act on someone else's escrow."""
        creator = st.creator or self.custody.creator_wallet(s, job.owner_id)[0]
        if ej.creator.lower() != creator.lower():
            return (f"escrow job {st.escrow_job} was opened by {ej.creator}, not by the creator's wallet {creator}: "
                    "it is not this job's deposit; the job deposits under a new escrow id")
        if ej.deposit < int(st.deposit):
            return (f"the escrow holds {pr.tokens(ej.deposit)} tokens for this job, less than its deposit of "
                    f"{pr.tokens(int(st.deposit))}: the job is not started (a fee-on-transfer token?); cancel it "
                    "to get the tokens back")
        if st.status in (SettlementStatus.new, SettlementStatus.funding):
            left, want = ej.deadline - self.chain.timestamp(), int(self.pricing.deadline_seconds * DEADLINE_SLACK)
            if left < want:
                return (f"the escrow's deadline is {max(0, left)} s away; a deposit must stay at least {want} s "
                        "(its refund would otherwise come before the work is reviewed): cancel the job, and "
                        "deposit with the deadline GET /api/jobs/{id}/deposit gives")
        return ""

    def to_fund(self) -> list[int]:
        """Jobs waiting in ``funding`` whose deposit is confirmed in escrow (checked by :meth:`_escrow_problem`)."""
        with new_session(self.engine) as s:
            return list(s.exec(select(Job.id).join(Settlement, Settlement.job_id == Job.id)
                               .where(Job.status == JobStatus.funding.value)
                               .where(Settlement.status.in_([SettlementStatus.open.value, SettlementStatus.posted.value]))
                               .where(Settlement.error == "")).all())

    def fund(self, job_id: int) -> None:
        """funding → queued, on the coordinator's thread, once the deposit is confirmed. Idempotent."""
        with new_session(self.engine) as s:
            job, st = s.get(Job, job_id), s.get(Settlement, job_id)
            if job is None or st is None or job.status != JobStatus.funding.value:
                return
            transition(s, job, JobStatus.queued, now=self.clock(),
                       reason=f"deposit of {pr.tokens(int(st.deposit))} tokens confirmed in escrow {st.escrow_job}")
            s.commit()

    def _deposit(self, s: Session, st: Settlement, job: Job) -> bool:
        """Take the deposit from the creator's wallet: gas money and demo tokens first on a dev token,
        then the token allowance, then open_job. One transaction per call."""
        chain = self.chain
        if not st.creator:
            st.creator = self.custody.creator_wallet(s, job.owner_id)[0]  # chosen once: linking later changes new jobs only
        address, key = st.creator, self.custody.key_for(s, st, job.owner_id)
        deposit = int(st.deposit)
        if st.status != SettlementStatus.funding.value:
            st.status = SettlementStatus.funding.value
            s.add(st)
            s.commit()
        if key is None:
            return False  # the creator's own wallet deposits (the job page, or farm deposit): nothing to send
        if self.deployment.get("dev_token"):
            if chain.eth_balance(address) < ch.DEV_ETH // 10:
                self.send(s, None, "fund", chain.operator_key, to=address, value=ch.DEV_ETH, detail=address)
                return True
            balance = chain.token_balance(address)
            if balance < deposit:
                self.send(s, None, "mint", chain.operator_key,
                           chain.mint(address, max(self.pricing.demo_tokens, deposit - balance)),
                           detail=address)
                wallet = s.get(CreatorWallet, job.owner_id)
                wallet.funded_at = time.time()
                s.add(wallet)
                s.commit()
                return True
        else:
            balance = chain.token_balance(address)
            if balance < deposit or chain.eth_balance(address) == 0:
                self._note_error(job.id, f"the creator's wallet {address} holds {pr.tokens(balance)} tokens; the "
                                         f"deposit needs {pr.tokens(deposit)} and some gas money: send both to it")
                return False
        if chain.allowance(address) < deposit:
            # the whole balance, not this deposit: the creator's next jobs open with one transaction, not
            # two. Only this key can spend it (open_job pulls from msg.sender alone), and the farm holds it.
            allow = max(deposit, chain.token_balance(address))
            self.send(s, job.id, "allow", key, chain.approve_spend(chain.escrow.address, allow))
            return True
        deadline = chain.timestamp() + self.pricing.deadline_seconds
        self.send(s, job.id, "open", key, chain.open_job(int(st.escrow_job), deposit, deadline),
                   detail=f"deposit {pr.tokens(deposit)}")
        return True

    def _compute(self, s: Session, st: Settlement, job: Job, deposit: int) -> None:
        shares, capped = pr.shares(s, self.pricing, job.id, deposit, ch.checksum)
        round_ = st.payout_round + 1
        computed = select(Payout).where(Payout.job_id == job.id).where(Payout.status == PayoutStatus.computed.value)
        for old in s.exec(computed):
            old.status = PayoutStatus.superseded.value
            s.add(old)
        for x in shares:
            s.add(Payout(job_id=job.id, round=round_, worker_id=x.worker_id, wallet=x.wallet, work_ms=x.work_ms,
                         tasks=x.tasks, check_ms=x.check_ms, checks=x.checks, amount=str(x.amount),
                         status=(PayoutStatus.computed if x.wallet else PayoutStatus.unpayable).value))
            if not x.wallet:
                log.warning("worker %s gave no valid payout address (farm worker --wallet 0x…): its share of job %d "
                            "stays with the creator", x.worker_id, job.id)
        wallets, amounts = pr.onchain_list(shares)
        if len(wallets) > 512:
            raise ch.TxRejected(f"{len(wallets)} wallets exceed the escrow's 512 payees per job")
        st.payout_round, st.payouts_hash = round_, ch.payouts_hash(wallets, amounts)
        st.payout_total, st.fee = str(sum(amounts)), str(self.pricing.fee(sum(amounts)))
        st.capped, st.needs_payouts, st.error = capped, False, ""
        s.add(st)
        s.commit()
        if capped:
            log.warning("job %d cost more than its deposit: payouts scaled to fit %s tokens", job.id,
                        pr.tokens(deposit))

    def _current_list(self, s: Session, st: Settlement) -> tuple[list[str], list[int]]:
        rows = s.exec(select(Payout).where(Payout.job_id == st.job_id).where(Payout.round == st.payout_round)).all()
        return pr.onchain_list([pr.Share(r.worker_id, r.wallet, r.work_ms, r.tasks, int(r.amount), r.check_ms, r.checks)
                                for r in rows])

    def _credited(self, s: Session, st: Settlement, ej: ch.EscrowJob) -> None:
        if st.status in (SettlementStatus.approved, SettlementStatus.paid):
            return
        st.status, st.round, st.updated_at = SettlementStatus.approved.value, ej.round, time.time()
        if ej.payouts_hash == st.payouts_hash:
            for p in s.exec(select(Payout).where(Payout.job_id == st.job_id).where(Payout.round == st.payout_round)
                            .where(Payout.status == PayoutStatus.computed.value)):
                p.status = PayoutStatus.credited.value
                s.add(p)
        else:
            st.error = "the chain approved a payout list this database does not have: check the escrow events"
        s.add(st)
        s.commit()

    # ------------------------------------------------------------------ finishing (coordinator thread)
    def to_finalize(self) -> list[int]:
        with new_session(self.engine) as s:
            approved = select(Settlement.job_id).where(Settlement.status == SettlementStatus.approved.value)
            return list(s.exec(approved).all())

    def finalize(self, job_id: int) -> None:
        """approved → paid, once the escrow credited the payouts. Idempotent."""
        with new_session(self.engine) as s:
            st, job = s.get(Settlement, job_id), s.get(Job, job_id)
            if st is None or st.status != SettlementStatus.approved:
                return
            if job.status == JobStatus.approved.value:
                tx = s.exec(select(ChainTx.tx_hash).where(ChainTx.job_id == job_id).where(ChainTx.kind == "approve")
                            .where(ChainTx.status == TxStatus.mined.value)).first()
                transition(s, job, JobStatus.paid, reason=f"payouts credited on chain (tx {tx or 'by the creator'})")
            elif job.status not in (JobStatus.paid.value, JobStatus.canceled.value):  # canceled: stays so
                return  # approved on chain while the DB still reviews (a creator using their own wallet)
            st.status, st.updated_at = SettlementStatus.paid.value, time.time()
            s.add(st)
            s.commit()

    @property
    def review_seconds(self) -> int:
        return int(self.deployment.get("review_seconds") or REVIEW_WINDOW_SECONDS)

    def balances(self, address: str) -> dict[str, Any]:
        chain = self.require_chain()
        addr = ch.checksum(address)
        if addr is None:
            raise LedgerError(f"{address!r} is not an address (0x and 40 hex digits)", 422)
        tok, credit, eth = chain.token_balance(addr), chain.credit(addr), chain.eth_balance(addr)
        return {"address": addr, "token": str(tok), "token_tokens": pr.tokens(tok), "escrow_credit": str(credit),
                "escrow_credit_tokens": pr.tokens(credit), "eth": str(eth)}

    def withdraw_for(self, address: str) -> dict[str, Any]:
        """Push ``address``'s escrow credit to it (the operator pays the gas). Any thread."""
        chain = self.require_chain()
        addr = ch.checksum(address)
        if addr is None:
            raise LedgerError(f"{address!r} is not an address (0x and 40 hex digits)", 422)
        amount = chain.credit(addr)
        if amount == 0:
            raise LedgerError(f"{addr} has nothing to withdraw (its escrow credit is 0)")
        with new_session(self.engine) as s:
            try:
                row = self.send(s, None, "withdraw", chain.operator_key, chain.withdraw_for(addr),
                                 detail=addr)
            except ch.TxRejected as exc:
                raise LedgerError(str(exc)) from None
        return {"address": addr, "amount": str(amount), "amount_tokens": pr.tokens(amount), "tx_hash": row.tx_hash,
                "status": row.status}

    def require_chain(self) -> ch.Chain:
        if self.chain is None:
            raise LedgerError("the chain is not connected yet (starting, or its node is down): retry shortly", 503)
        return self.chain
