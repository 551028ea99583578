"""Payment tables: the database's mirror of the escrow on chain (used by :mod:`farm.payments.ledger`).

Token amounts are in the token's smallest unit (wei, 18 decimals) and are stored as decimal strings,
because they overflow the 64-bit integers of SQLite and PostgreSQL. Invariants:

* one :class:`Settlement` per job (its primary key): settling is idempotent per job, and the escrow's job
  id is derived from the farm's namespace and the job id, so the contract refuses a second deposit;
* ``epoch`` numbers the deployments: a chain that was reset (the embedded EVM after a restart) gets a new
  escrow and a new epoch, so its transactions and events never mix with the old chain's (a fresh dev
  chain replays the very same transaction hashes);
* every transaction is written as a :class:`ChainTx` with its signed bytes *before* it is broadcast, so a
  coordinator that dies between "sent" and "receipt" finds it again and never signs a second one for the
  same step (re-broadcasting the same bytes cannot pay twice: same hash, same nonce);
* :class:`ChainEvent` rows are the escrow's events as read from the chain (unique per escrow, transaction
  and log index), whoever sent the transactions;
* :class:`Payout` rows of one (job, round) are the list posted on chain for that round; only the rows of
  the round the creator approved become ``credited``.
"""
from __future__ import annotations

import enum
import time
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


class SettlementStatus(str, enum.Enum):
    """Where a job's escrow stands (``Settlement.status``), as the ledger last saw it on chain."""
    new = "new"              # no deposit yet
    funding = "funding"      # the creator's wallet is being funded and the token allowance set
    open = "open"            # deposited; rendering
    posted = "posted"        # the payout list is on chain, waiting for the creator's approval
    disputed = "disputed"    # the creator rejected the posted list: a new round follows
    approved = "approved"    # the creator approved: workers are credited
    paid = "paid"            # the operator's fee and the refund are out: settled
    refunded = "refunded"    # the deposit went back (deadline passed)
    released = "released"    # a canceled or failed job's deposit went back


SETTLEMENT_FINAL = (SettlementStatus.paid.value, SettlementStatus.refunded.value, SettlementStatus.released.value)


class PayoutStatus(str, enum.Enum):
    """One worker's share of a payout round (``Payout.status``)."""
    computed = "computed"      # in the round's list
    credited = "credited"      # the creator approved this round: the escrow credits the wallet
    superseded = "superseded"  # a later round replaced it
    unpayable = "unpayable"    # the worker gave no wallet


class TxStatus(str, enum.Enum):
    """A transaction the farm signed (``ChainTx.status``): signed → sent → mined | reverted | dropped."""
    signed = "signed"
    sent = "sent"
    mined = "mined"
    reverted = "reverted"
    dropped = "dropped"


def _now() -> float:
    return time.time()


class CreatorWallet(SQLModel, table=True):
    """A creator's wallet. Custodial (the default): ``address``'s key is derived from the farm's wallet seed
    and the user id, so the farm deposits and signs approvals for the creator through the API; on a dev chain
    it is given gas money and demo tokens. Once the creator links a wallet of their own (Sign-In with
    Ethereum), ``own_address`` is set and ``custodial`` is False: their new jobs are deposited from it and
    approved or rejected only by its EIP-712 signatures, which the farm cannot make."""
    user_id: int = Field(foreign_key="user.id", primary_key=True)
    address: str = Field(index=True)
    custodial: bool = True
    own_address: str = Field(default="", index=True)
    linked_at: Optional[float] = None
    funded_at: Optional[float] = None
    created_at: float = Field(default_factory=_now)


class WalletChallenge(SQLModel, table=True):
    """A Sign-In with Ethereum message issued to an account: its nonce is used once, before it expires."""
    nonce: str = Field(primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    message: str
    expires_at: float
    used: bool = False


class Settlement(SQLModel, table=True):
    """The escrow of one job. ``status``: new → open → posted ⇄ disputed → approved → paid; or refunded
    (deadline passed) / released (job canceled or failed: the operator gave the deposit back)."""
    job_id: int = Field(foreign_key="job.id", primary_key=True)
    epoch: int = 0  # the deployment holding this escrow
    escrow_job: str = Field(index=True)  # the escrow's uint256 job id, decimal
    creator: str = ""
    status: str = Field(default="new", index=True)
    estimate: str = "0"
    deposit: str = "0"
    deadline: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))  # unix time past 2038
    round: int = 0                 # round of the list posted on chain
    payout_round: int = 0          # newest list computed here
    payouts_hash: str = ""         # hash of the newest computed list
    payout_total: str = "0"
    fee: str = "0"
    capped: bool = False           # the actual cost exceeded the deposit; payouts were scaled to fit
    needs_payouts: bool = True     # compute a new list once the job is rendered
    reject_pending: bool = False   # the creator rejected; the dispute is not on chain yet
    reject_reason: str = ""
    approve_sig: str = ""          # a creator's own wallet: its EIP-712 approval, relayed by the ledger
    reject_sig: str = ""           # ... and its EIP-712 rejection
    error: str = ""
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)


class Payout(SQLModel, table=True):
    """One worker's share of one posted round: work units (measured milliseconds of its accepted attempts),
    the spot checks it ran for the job (``check_ms``, ``checks``: paid by the job too) and the amount. ``status``: computed | credited | superseded | unpayable (no wallet)."""
    __table_args__ = (UniqueConstraint("job_id", "round", "worker_id"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    round: int
    worker_id: str
    wallet: str = ""
    work_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    tasks: int = 0
    check_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))  # checks it ran
    checks: int = 0
    amount: str = "0"
    status: str = "computed"
    created_at: float = Field(default_factory=_now)


class ChainTx(SQLModel, table=True):
    """A transaction the farm signed. ``status``: signed → sent → mined | reverted | dropped."""
    __table_args__ = (UniqueConstraint("epoch", "tx_hash"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    epoch: int = 0
    job_id: Optional[int] = Field(default=None, index=True)
    kind: str  # fund | mint | allow | open | post | reject | approve | release | withdraw
    sender: str
    nonce: int
    tx_hash: str = Field(index=True)
    raw: str
    status: str = Field(default="signed", index=True)
    block: Optional[int] = None
    gas_used: Optional[int] = None
    detail: str = ""
    error: str = ""
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)


class ChainEvent(SQLModel, table=True):
    """An escrow event read from the chain."""
    __table_args__ = (UniqueConstraint("epoch", "tx_hash", "log_index"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    epoch: int = 0
    escrow: str
    block: int = Field(index=True)
    tx_hash: str
    log_index: int
    name: str
    escrow_job: str = Field(default="", index=True)
    job_id: Optional[int] = Field(default=None, index=True)
    args: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    at: float = Field(default_factory=_now)


class ChainMeta(SQLModel, table=True):
    """Small facts about the chain connection: the deployment, the farm's namespace, the event cursor."""
    key: str = Field(primary_key=True)
    value: str = ""
