"""Custodial creator wallets, and whose key signs for an escrow.

A creator without a wallet of their own gets a custodial one: its key is derived from the farm's secret
seed (``DATA/wallet.seed``, mode 600, made once) and the user id, so it is never stored and the same after
a restart. A creator who links a wallet of their own (farm/payments/own_wallets.py) deposits from it, and
the farm holds no key of it. Invariants:

* the key that signs for an escrow is chosen by the address that deposited into it, never by what the
  creator's account says now: linking a wallet later changes new jobs only, and an old custodial job
  stays custodial;
* a signature the creator's own wallet gave is used only when it recovers to that escrow's creator for
  the escrow's current round and list; otherwise it is dropped and the creator is asked to sign again.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from sqlmodel import Session

from common import eth_sign
from farm.payments import chain as ch
from farm.store.ledger_models import CreatorWallet, Settlement
from farm.store.models import Job


def load_seed(data_dir: Path) -> bytes:
    """The secret from which custodial creator keys are derived (made on first use, mode 600)."""
    path = data_dir / "wallet.seed"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        seed = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(seed.hex() + "\n")
        return seed


class Custody:
    def __init__(self, data_dir: Path):
        self.seed = load_seed(Path(data_dir))

    def key_of(self, user_id: int) -> str:
        """The custodial key of user ``user_id`` (derived, never stored)."""
        return ch.derive_key(self.seed, f"creator:{user_id}")

    def custodial_wallet(self, s: Session, user_id: int) -> tuple[str, str]:
        """The creator's custodial wallet (address, key), created on first use."""
        key = self.key_of(user_id)
        address = ch.address_of(key)
        if s.get(CreatorWallet, user_id) is None:
            s.add(CreatorWallet(user_id=user_id, address=address))
            s.commit()
        return address, key

    def creator_wallet(self, s: Session, user_id: int) -> tuple[str, str | None]:
        """The wallet the creator's new jobs deposit from: (address, key), the key None for a wallet of their
        own (linked by signing in with it; the farm holds no key of it)."""
        address, key = self.custodial_wallet(s, user_id)
        row = s.get(CreatorWallet, user_id)
        if row.own_address:
            return row.own_address, None
        return address, key

    def key_for(self, s: Session, st: Settlement, user_id: int) -> str | None:
        """The key that signs for this escrow: the custodial one when it deposited, else none."""
        address, key = self.custodial_wallet(s, user_id)
        return key if st.creator.lower() == address.lower() else None

    def creator_sig(self, chain: ch.Chain, s: Session, st: Settlement, kind: str, ej: ch.EscrowJob,
                    h: str) -> bytes | None:
        """The creator's EIP-712 signature of Approve/Reject(escrow job, the escrow's round, ``h``): made here
        with the custodial key, or the one the creator's own wallet gave (checked: a signature for another
        round or list is dropped, and None returned)."""
        job = s.get(Job, st.job_id)
        key = self.key_for(s, st, job.owner_id)
        if key is not None:
            return (chain.sign_approve if kind == "approve" else chain.sign_reject)(key, int(st.escrow_job), ej.round, h)
        sig = st.approve_sig if kind == "approve" else st.reject_sig
        if not sig:
            return None
        typed = (eth_sign.approve_typed if kind == "approve" else eth_sign.reject_typed)(
            chain.chain_id(), chain.escrow.address, int(st.escrow_job), ej.round, h)
        try:
            good = eth_sign.recover_typed(typed, sig).lower() == st.creator.lower()
        except eth_sign.SignatureError:
            good = False
        if not good:
            setattr(st, "approve_sig" if kind == "approve" else "reject_sig", "")
            st.error = (f"the creator's {kind} signature is not for round {ej.round} of escrow job {st.escrow_job}: "
                        "sign again on the job page")
            s.add(st)
            s.commit()
            return None
        return bytes.fromhex(sig[2:])
