"""Creators who pay and approve with a wallet of their own: linking, deposits, and the signatures relayed.

A creator links an address to their account by signing a Sign-In with Ethereum message (EIP-4361) that the
farm issued with a single-use nonce (:func:`challenge`, :func:`link`). From then on their new jobs wait in
``funding`` until that address deposits (:func:`deposit_terms` gives the two transactions for the wallet to
send: the token allowance and ``open_job``, with a deadline the ledger accepts), and the job is approved or
rejected only by that wallet's EIP-712 signatures of the escrow's Approve / Reject (:func:`approval_request`,
:func:`rejection_request` give the typed data; :func:`check_signature` refuses a forged, stale or replayed
one before anything changes). The farm holds no key of the address, so it cannot approve for the creator;
the escrow checks the signature again on chain (``approve_by_sig``). A creator who stays silent is settled
by the operator once the escrow's review window has passed (``settle_unreviewed``), as custodial jobs are
auto-approved: silence never keeps the work for free.

Jobs already deposited from the custodial wallet stay custodial to the end (the ledger picks the key by the
address that deposited). :func:`move_custodial` sends what the custodial wallet holds to the linked address.

Every function takes a :class:`~farm.payments.ledger.Ledger` and raises
:class:`~farm.payments.ledger.LedgerError` with the HTTP status and what to do. Any thread (chain I/O).
"""
from __future__ import annotations

import secrets
import time
from typing import Any

from sqlmodel import Session, delete, select

from common import eth_sign
from farm.kinds import jobs
from farm.payments import chain as ch
from farm.payments import pricing as pr
from farm.payments.chain import EscrowState
from farm.payments.ledger import Ledger, LedgerError
from farm.store.db import session as new_session
from farm.store.ledger_models import CreatorWallet, Settlement, WalletChallenge
from farm.store.models import Job, User

MAX_OPEN_CHALLENGES = 8  # unexpired sign-in messages one account may hold (more: the oldest go)


def wallet_view(ledger: Ledger, s: Session, user: User) -> dict[str, Any]:
    """The account's wallets: the custodial one (its key on the farm) and the linked one, with balances."""
    custodial, _ = ledger.custody.custodial_wallet(s, user.id)
    row = s.get(CreatorWallet, user.id)
    view = {**ledger.balances(row.own_address or custodial), "custodial": not row.own_address,
            "custodial_address": custodial, "own_address": row.own_address or None, "linked_at": row.linked_at,
            "chain_id": ledger.require_chain().chain_id(), "escrow": ledger.deployment.get("escrow"),
            "token": ledger.deployment.get("token")}
    if row.own_address:
        left = ledger.balances(custodial)
        view["custodial_left"] = {"token": left["token"], "token_tokens": left["token_tokens"],
                                  "escrow_credit": left["escrow_credit"],
                                  "escrow_credit_tokens": left["escrow_credit_tokens"]}
    return view


# ------------------------------------------------------------------ linking (Sign-In with Ethereum)
def challenge(ledger: Ledger, s: Session, user: User, address: str, domain: str, uri: str,
              now: float | None = None) -> dict[str, Any]:
    """A sign-in message for ``address`` to link it to ``user``'s account, valid for SIWE_TTL seconds."""
    now = time.time() if now is None else now
    chain = ledger.require_chain()
    try:
        address = eth_sign.checksum(address)
    except eth_sign.SignatureError as exc:
        raise LedgerError(str(exc), 422) from None
    s.exec(delete(WalletChallenge).where(WalletChallenge.expires_at < now))
    mine = s.exec(select(WalletChallenge).where(WalletChallenge.user_id == user.id)
                  .order_by(WalletChallenge.expires_at.desc())).all()
    for old in mine[MAX_OPEN_CHALLENGES - 1:]:
        s.delete(old)
    nonce = secrets.token_hex(16)
    message = eth_sign.siwe_message(domain=domain, uri=uri, address=address, account=user.name,
                                    chain_id=chain.chain_id(), nonce=nonce, issued_at=now)
    s.add(WalletChallenge(nonce=nonce, user_id=user.id, message=message, expires_at=now + eth_sign.SIWE_TTL))
    s.commit()
    return {"message": message, "nonce": nonce, "address": address, "expires_in": eth_sign.SIWE_TTL}


def link(ledger: Ledger, s: Session, user: User, message: str, signature: str,
         now: float | None = None) -> dict[str, Any]:
    """Link the address that signed ``message`` (issued by :func:`challenge` to this account) as the
    account's own wallet. The nonce is spent whether or not the signature verifies."""
    now = time.time() if now is None else now
    try:
        fields = eth_sign.siwe_fields(message)
    except eth_sign.SignatureError as exc:
        raise LedgerError(str(exc), 422) from None
    row = s.get(WalletChallenge, fields["nonce"])
    if row is None or row.user_id != user.id or row.used:
        raise LedgerError("this sign-in message was not issued to your account, or was used already: ask for a "
                          "new one (POST /api/wallet/challenge) and sign it once", 403)
    row.used = True
    s.add(row)
    s.commit()
    try:
        address = eth_sign.siwe_verify(message, signature, expected=row.message, now=now)
    except eth_sign.SignatureError as exc:
        raise LedgerError(str(exc), 403) from None
    ledger.custody.custodial_wallet(s, user.id)
    taken = s.exec(select(CreatorWallet).where(CreatorWallet.own_address == address)
                   .where(CreatorWallet.user_id != user.id)).first()
    if taken is not None:
        raise LedgerError(f"{address} is linked to another account already: one wallet pays for one account", 409)
    w = s.get(CreatorWallet, user.id)
    w.own_address, w.custodial, w.linked_at = address, False, now
    s.add(w)
    s.commit()
    return wallet_view(ledger, s, user)


def move_custodial(ledger: Ledger, s: Session, user: User) -> dict[str, Any]:
    """Send the custodial wallet's tokens (its escrow credit first) to the linked wallet."""
    chain = ledger.require_chain()
    w = s.get(CreatorWallet, user.id)
    if w is None or not w.own_address:
        raise LedgerError("link a wallet of your own first (Connect wallet on the page, or farm wallet link)", 409)
    address, key = ledger.custody.custodial_wallet(s, user.id)
    txs = []
    try:
        if chain.credit(address):
            txs.append(ledger.send(s, None, "withdraw", chain.operator_key, chain.withdraw_for(address),
                                    detail=address).tx_hash)
        amount = chain.token_balance(address)
        if amount == 0:
            if not txs:
                raise LedgerError(f"the custodial wallet {address} holds no tokens: nothing to move", 409)
        else:
            if chain.eth_balance(address) < ch.DEV_ETH // 100 and ledger.deployment.get("dev_token"):
                txs.append(ledger.send(s, None, "fund", chain.operator_key, to=address, value=ch.DEV_ETH // 10,
                                        detail=address).tx_hash)
            txs.append(ledger.send(s, None, "move", key, chain.transfer(w.own_address, amount),
                                    detail=f"{address} -> {w.own_address}").tx_hash)
    except ch.TxRejected as exc:
        raise LedgerError(f"the move was refused on chain: {exc}") from None
    return {"from": address, "to": w.own_address, "amount": str(amount), "amount_tokens": pr.tokens(amount),
            "transactions": txs}


# ------------------------------------------------------------------ a job's deposit and review
def _own_settlement(ledger: Ledger, s: Session, job: Job) -> Settlement:
    st = s.get(Settlement, job.id)
    if st is None:
        raise LedgerError(f"job {job.id} has no escrow yet (the ledger opens one within a second): retry", 409)
    if not st.creator:
        st.creator = ledger.custody.creator_wallet(s, job.owner_id)[0]
        s.add(st)
        s.commit()
    if ledger.custody.key_for(s, st, job.owner_id) is not None:
        raise LedgerError(f"job {job.id} is paid from your custodial wallet: the farm deposits and signs for it "
                          "(POST /api/jobs/{id}/approve with no signature)", 409)
    return st


def is_own(ledger: Ledger, s: Session, job: Job) -> bool:
    """Whether the job's escrow is (or will be) the creator's own wallet's: then only its signatures count."""
    st = s.get(Settlement, job.id)
    creator = (st.creator if st is not None and st.creator else ledger.custody.creator_wallet(s, job.owner_id)[0])
    return creator.lower() != ledger.custody.custodial_wallet(s, job.owner_id)[0].lower()


def deposit_terms(ledger: Ledger, s: Session, job: Job) -> dict[str, Any]:
    """What the creator's own wallet sends to deposit for ``job``, and whether it has."""
    chain = ledger.require_chain()
    st = _own_settlement(ledger, s, job)
    ej = chain.escrow_job(int(st.escrow_job))
    deadline = chain.timestamp() + ledger.pricing.deadline_seconds
    view = {"job_id": job.id, "chain_id": chain.chain_id(), "from": st.creator, "escrow": chain.escrow.address,
            "token": chain.token.address, "escrow_job": st.escrow_job, "amount": st.deposit,
            "amount_tokens": pr.tokens(int(st.deposit)), "deadline": deadline, "escrow_state": ej.state,
            "deposited": ej.state != EscrowState.none, "error": st.error,
            "balance": str(chain.token_balance(st.creator)), "allowance": str(chain.allowance(st.creator))}
    if ej.state == EscrowState.none:
        calls = chain.deposit_calls(int(st.escrow_job), int(st.deposit), deadline)
        view["calls"] = calls if chain.allowance(st.creator) < int(st.deposit) else calls[1:]
    return view


def approval_request(ledger: Ledger, s: Session, job: Job) -> dict[str, Any]:
    """The typed data of the escrow's Approve for the list now posted, with the list itself."""
    chain = ledger.require_chain()
    st = _own_settlement(ledger, s, job)
    ej = chain.escrow_job(int(st.escrow_job))
    if ej.state != EscrowState.posted:
        raise LedgerError(f"job {job.id}'s payout list is not on chain yet (escrow {ej.state}): the farm posts it "
                          "once the job is rendered; retry in a few seconds", 409)
    wallets, amounts = ledger._current_list(s, st)
    listed = ch.payouts_hash(wallets, amounts)
    if listed != ej.payouts_hash:
        raise LedgerError("the payout list on chain is not the one this farm computed last: wait for the farm "
                          "to post its newest list, then sign", 409)
    return {"job_id": job.id, "escrow_job": st.escrow_job, "round": ej.round, "payouts_hash": ej.payouts_hash,
            "payouts": [{"wallet": w, "amount": str(a), "amount_tokens": pr.tokens(a)}
                        for w, a in zip(wallets, amounts)],
            "fee": str(ej.fee), "deposit": str(ej.deposit), "signer": st.creator,
            "typed_data": eth_sign.approve_typed(chain.chain_id(), chain.escrow.address, int(st.escrow_job),
                                                 ej.round, ej.payouts_hash)}


def rejection_request(ledger: Ledger, s: Session, job: Job, record: str) -> dict[str, Any]:
    """The typed data of the escrow's Reject of ``record`` (the frames and reason, as review records them)."""
    chain = ledger.require_chain()
    st = _own_settlement(ledger, s, job)
    ej = chain.escrow_job(int(st.escrow_job))
    if ej.state not in (EscrowState.open, EscrowState.posted) or ej.disputes >= 2:
        raise LedgerError(f"job {job.id}'s escrow cannot be disputed now ({ej.state}, {ej.disputes} disputes of 2): "
                          "approve it, or wait until the re-rendered list is posted", 409)
    return {"job_id": job.id, "escrow_job": st.escrow_job, "round": ej.round, "record": record,
            "reason_hash": ch.text_hash(record), "signer": st.creator,
            "typed_data": eth_sign.reject_typed(chain.chain_id(), chain.escrow.address, int(st.escrow_job),
                                                ej.round, ch.text_hash(record))}


def check_signature(ledger: Ledger, s: Session, job: Job, kind: str, signature: str, record: str = "") -> str:
    """The creator's own wallet's signature of Approve (the posted list) or Reject (``record``), checked
    against the escrow's current round; :class:`LedgerError` 403 when anyone else signed it, or it was made
    for another job, round or list (a replay). Returns the signature to store."""
    req = approval_request(ledger, s, job) if kind == "approve" else rejection_request(ledger, s, job, record)
    try:
        signer = eth_sign.recover_typed(req["typed_data"], signature)
    except eth_sign.SignatureError as exc:
        raise LedgerError(str(exc), 422) from None
    if signer.lower() != req["signer"].lower():
        raise LedgerError(f"this {kind} is not signed by job {job.id}'s wallet {req['signer']} for round "
                          f"{req['round']} (signed by {signer}: another wallet, job or round): sign the typed "
                          f"data GET /api/jobs/{job.id}/{'approval' if kind == 'approve' else 'rejection'} gives", 403)
    return signature


def accept_signature(ledger: Ledger, engine, job: int, user: User, kind: str, signature: str,
                     record: str = "") -> str:
    """Before an approval or rejection changes anything: "" for a custodial job (the farm signs at relay
    time); for a job paid from the creator's own wallet, its checked signature (kept for the ledger to
    relay, for an approval) — and :class:`LedgerError` 409 without one, 403 for a wrong one."""
    with new_session(engine) as s:
        j = jobs.get_job(s, job, user)
        if j.owner_id != user.id:
            raise LedgerError(f"only the creator of job {job} can review it", 403)
        if not is_own(ledger, s, j) or (kind == "approve" and j.status in ("approved", "paid")):
            return ""  # custodial (the farm signs), or approved already: approving twice pays once
        if not signature:
            where = (f"GET /api/jobs/{job}/approval" if kind == "approve" else f"POST /api/jobs/{job}/rejection")
            raise LedgerError(f"job {job} is paid from your own wallet: sign the typed data {where} gives in that "
                              "wallet (the job page's buttons do) and send the signature", 409)
        sig = check_signature(ledger, s, j, kind, signature, record)
        if kind == "approve":
            st = s.get(Settlement, job)
            st.approve_sig, st.error = sig, ""
            s.add(st)
            s.commit()
        return sig
