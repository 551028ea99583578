# pragma version ~=0.4.3
"""
@title JobEscrow: render jobs paid in an ERC-20, released by the creator's approval
@notice Life of a job (state):
        NONE --open_job (creator deposits)--> OPEN
        OPEN | POSTED | DISPUTED --post_payouts (operator)--> POSTED
        OPEN | POSTED --reject (creator)--> DISPUTED        (the farm re-renders)
        POSTED --approve (creator, or the creator's EIP-712 signature relayed)--> APPROVED
        POSTED --settle_unreviewed (operator, REVIEW_SECONDS after posting, the creator silent)--> APPROVED
        OPEN --refund (anyone, after the deadline)--> REFUNDED
        POSTED --refund (after the deadline and 2 x REVIEW_SECONDS after posting)--> REFUNDED
        DISPUTED --refund (after the deadline and REVIEW_SECONDS after the dispute)--> REFUNDED
        OPEN | POSTED | DISPUTED --release (operator gives up its claim)--> REFUNDED
        On approval each worker of the posted list is credited its amount, the
        operator its fee, and the creator the remainder of the deposit. Every
        credit is withdrawn by pull (`withdraw`, or `withdraw_for` which anyone
        may call and which always pays the credited account itself).
@custom:invariants
        - TOKEN.balanceOf(self) >= sum of deposits of unsettled jobs + sum of credits
          (equality unless someone sends tokens here directly).
        - A job's deposit is moved to credits exactly once (APPROVED and REFUNDED are final).
        - The posted payouts plus the fee never exceed the deposit; only the operator posts.
        - Only the creator approves or rejects; an approval names the exact payout list
          (by its hash and round), so a re-posted list invalidates older signatures.
        - A creator who stays silent cannot keep the work for free: a posted list the creator
          neither approves nor rejects within REVIEW_SECONDS is settled by the operator (optimistic
          settlement: the creator's protection is the dispute, at most MAX_DISPUTES per job), and the
          deadline's refund never pre-empts the operator's turn (it waits REVIEW_SECONDS after a
          dispute, twice that after a posting).
        - `withdraw*` zeroes the credit before the token call and holds the re-entrancy lock.
@dev The payout list is passed as calldata and committed by its keccak hash; the full list is
     published in the PayoutsPosted event and given again to `approve`. Storing it would cost
     two cold SSTOREs per worker (see bench/gas.py for the measured numbers).
"""

from ethereum.ercs import IERC20

from snekmate.utils import ecdsa
from snekmate.utils import eip712_domain_separator

initializes: eip712_domain_separator

exports: eip712_domain_separator.eip712Domain


MAX_PAYEES: public(constant(uint256)) = 512
MAX_DISPUTES: public(constant(uint256)) = 2
BPS: constant(uint256) = 10_000
MAX_FEE_BPS: constant(uint256) = 2_000

ST_NONE: constant(uint8) = 0
ST_OPEN: constant(uint8) = 1
ST_POSTED: constant(uint8) = 2
ST_DISPUTED: constant(uint8) = 3
ST_APPROVED: constant(uint8) = 4
ST_REFUNDED: constant(uint8) = 5

APPROVE_TYPEHASH: constant(bytes32) = keccak256("Approve(uint256 jobId,uint256 round,bytes32 payoutsHash)")
REJECT_TYPEHASH: constant(bytes32) = keccak256("Reject(uint256 jobId,uint256 round,bytes32 reasonHash)")


struct Job:
    creator: address
    state: uint8
    deposit: uint256
    deadline: uint256
    round: uint256
    payouts_hash: bytes32
    payout_total: uint256
    fee: uint256
    changed_at: uint256  # when the list was last posted or disputed (the review clock)
    disputes: uint256


event JobOpened:
    job_id: indexed(uint256)
    creator: indexed(address)
    deposit: uint256
    deadline: uint256

event PayoutsPosted:
    job_id: indexed(uint256)
    round: uint256
    payouts_hash: bytes32
    total: uint256
    fee: uint256
    workers: DynArray[address, MAX_PAYEES]
    amounts: DynArray[uint256, MAX_PAYEES]

event JobRejected:
    job_id: indexed(uint256)
    round: uint256
    reason_hash: bytes32

event JobApproved:
    job_id: indexed(uint256)
    round: uint256
    total: uint256
    fee: uint256
    remainder: uint256
    unreviewed: bool

event JobRefunded:
    job_id: indexed(uint256)
    creator: indexed(address)
    amount: uint256
    by_operator: bool

event Withdrawn:
    account: indexed(address)
    caller: indexed(address)
    amount: uint256


TOKEN: public(immutable(IERC20))
OPERATOR: public(immutable(address))
FEE_BPS: public(immutable(uint256))
REVIEW_SECONDS: public(immutable(uint256))

jobs: public(HashMap[uint256, Job])
credit: public(HashMap[address, uint256])


@deploy
def __init__(token_: IERC20, operator_: address, fee_bps_: uint256, review_seconds_: uint256):
    assert operator_ != empty(address), "escrow: operator is the zero address"
    assert fee_bps_ <= MAX_FEE_BPS, "escrow: fee above 20%"
    assert review_seconds_ > 0, "escrow: no review window"
    TOKEN = token_
    OPERATOR = operator_
    FEE_BPS = fee_bps_
    REVIEW_SECONDS = review_seconds_
    eip712_domain_separator.__init__("RenderhiveEscrow", "1")


@external
@nonreentrant
def open_job(job_id: uint256, amount: uint256, deadline: uint256):
    """
    @dev Pull `amount` from the caller (who becomes the job's creator) into escrow. The amount
         recorded is what actually arrived, so fee-on-transfer tokens cannot make the escrow
         promise more than it holds. Needs a prior `TOKEN.approve(escrow, amount)`.
    """
    assert self.jobs[job_id].state == ST_NONE, "escrow: job id already used"
    assert amount > 0, "escrow: empty deposit"
    assert deadline > block.timestamp, "escrow: deadline in the past"
    before: uint256 = staticcall TOKEN.balanceOf(self)
    assert extcall TOKEN.transferFrom(msg.sender, self, amount, default_return_value=True), "escrow: transfer failed"
    received: uint256 = staticcall TOKEN.balanceOf(self) - before
    assert received > 0, "escrow: nothing received"
    self.jobs[job_id] = Job(creator=msg.sender, state=ST_OPEN, deposit=received, deadline=deadline, round=0,
                            payouts_hash=empty(bytes32), payout_total=0, fee=0,
                            changed_at=block.timestamp, disputes=0)
    log JobOpened(job_id=job_id, creator=msg.sender, deposit=received, deadline=deadline)


@external
def post_payouts(job_id: uint256, workers: DynArray[address, MAX_PAYEES], amounts: DynArray[uint256, MAX_PAYEES]):
    """
    @dev The operator commits the job's payout list (once rendered, again after a dispute).
         The list plus the operator fee must fit in the deposit.
    """
    assert msg.sender == OPERATOR, "escrow: only the operator posts payouts"
    job: Job = self.jobs[job_id]
    assert job.state == ST_OPEN or job.state == ST_POSTED or job.state == ST_DISPUTED, "escrow: job not open"
    assert len(workers) == len(amounts), "escrow: workers and amounts differ in length"
    total: uint256 = 0
    for i: uint256 in range(len(workers), bound=MAX_PAYEES):
        assert workers[i] != empty(address), "escrow: payout to the zero address"
        assert amounts[i] > 0, "escrow: zero payout"
        total += amounts[i]
    fee: uint256 = total * FEE_BPS // BPS
    assert total + fee <= job.deposit, "escrow: payouts exceed the deposit"
    h: bytes32 = keccak256(abi_encode(workers, amounts))
    job.round += 1
    job.state = ST_POSTED
    job.payouts_hash = h
    job.payout_total = total
    job.fee = fee
    job.changed_at = block.timestamp
    self.jobs[job_id] = job
    log PayoutsPosted(job_id=job_id, round=job.round, payouts_hash=h, total=total, fee=fee, workers=workers,
                      amounts=amounts)


@internal
def _approve(job_id: uint256, job: Job, workers: DynArray[address, MAX_PAYEES], amounts: DynArray[uint256, MAX_PAYEES],
             unreviewed: bool):
    assert keccak256(abi_encode(workers, amounts)) == job.payouts_hash, "escrow: not the posted payout list"
    remainder: uint256 = job.deposit - job.payout_total - job.fee
    self.jobs[job_id].state = ST_APPROVED
    for i: uint256 in range(len(workers), bound=MAX_PAYEES):
        self.credit[workers[i]] += amounts[i]
    if job.fee > 0:
        self.credit[OPERATOR] += job.fee
    if remainder > 0:
        self.credit[job.creator] += remainder
    log JobApproved(job_id=job_id, round=job.round, total=job.payout_total, fee=job.fee, remainder=remainder,
                    unreviewed=unreviewed)


@external
@nonreentrant
def approve(job_id: uint256, workers: DynArray[address, MAX_PAYEES], amounts: DynArray[uint256, MAX_PAYEES]):
    """
    @dev The creator approves the posted payout list (given again; it must hash to the posted one).
    """
    job: Job = self.jobs[job_id]
    assert job.state == ST_POSTED, "escrow: no payouts to approve"
    assert msg.sender == job.creator, "escrow: only the creator approves"
    self._approve(job_id, job, workers, amounts, False)


@external
@nonreentrant
def approve_by_sig(job_id: uint256, workers: DynArray[address, MAX_PAYEES],
                   amounts: DynArray[uint256, MAX_PAYEES], signature: Bytes[65]):
    """
    @dev Anyone (the operator) relays the creator's EIP-712 signature of
         Approve(jobId, round, payoutsHash) for the current round.
    """
    job: Job = self.jobs[job_id]
    assert job.state == ST_POSTED, "escrow: no payouts to approve"
    digest: bytes32 = eip712_domain_separator._hash_typed_data_v4(
        keccak256(abi_encode(APPROVE_TYPEHASH, job_id, job.round, job.payouts_hash)))
    assert ecdsa._recover_sig(digest, signature) == job.creator, "escrow: not signed by the creator"
    self._approve(job_id, job, workers, amounts, False)


@external
@nonreentrant
def settle_unreviewed(job_id: uint256, workers: DynArray[address, MAX_PAYEES], amounts: DynArray[uint256, MAX_PAYEES]):
    """
    @dev The operator settles a posted list the creator neither approved nor disputed within
         REVIEW_SECONDS of its posting (the JobApproved event says `unreviewed`).
    """
    assert msg.sender == OPERATOR, "escrow: only the operator settles"
    job: Job = self.jobs[job_id]
    assert job.state == ST_POSTED, "escrow: no payouts to settle"
    assert block.timestamp >= job.changed_at + REVIEW_SECONDS, "escrow: the review window is still open"
    self._approve(job_id, job, workers, amounts, True)


@internal
def _reject(job_id: uint256, reason_hash: bytes32):
    assert self.jobs[job_id].disputes < MAX_DISPUTES, "escrow: no disputes left for this job"
    self.jobs[job_id].disputes += 1
    self.jobs[job_id].changed_at = block.timestamp
    self.jobs[job_id].state = ST_DISPUTED
    log JobRejected(job_id=job_id, round=self.jobs[job_id].round, reason_hash=reason_hash)


@external
def reject(job_id: uint256, reason_hash: bytes32):
    """
    @dev The creator disputes the result (hash of the rejected frames and reason); the operator
         re-renders and posts again.
    """
    job: Job = self.jobs[job_id]
    assert job.state == ST_OPEN or job.state == ST_POSTED, "escrow: nothing to reject"
    assert msg.sender == job.creator, "escrow: only the creator rejects"
    self._reject(job_id, reason_hash)


@external
def reject_by_sig(job_id: uint256, reason_hash: bytes32, signature: Bytes[65]):
    """
    @dev Relay of the creator's EIP-712 signature of Reject(jobId, round, reasonHash).
    """
    job: Job = self.jobs[job_id]
    assert job.state == ST_OPEN or job.state == ST_POSTED, "escrow: nothing to reject"
    digest: bytes32 = eip712_domain_separator._hash_typed_data_v4(
        keccak256(abi_encode(REJECT_TYPEHASH, job_id, job.round, reason_hash)))
    assert ecdsa._recover_sig(digest, signature) == job.creator, "escrow: not signed by the creator"
    self._reject(job_id, reason_hash)


@internal
def _refund(job_id: uint256, by_operator: bool):
    job: Job = self.jobs[job_id]
    assert job.state == ST_OPEN or job.state == ST_POSTED or job.state == ST_DISPUTED, "escrow: job not refundable"
    self.jobs[job_id].state = ST_REFUNDED
    self.credit[job.creator] += job.deposit
    log JobRefunded(job_id=job_id, creator=job.creator, amount=job.deposit, by_operator=by_operator)


@external
@nonreentrant
def refund(job_id: uint256):
    """
    @dev After the deadline, an unapproved job's deposit goes back to its creator (anyone may call),
         but never before the operator's turn: REVIEW_SECONDS after a dispute (to post again), twice
         that after a posting (to settle it unreviewed).
    """
    job: Job = self.jobs[job_id]
    assert block.timestamp > job.deadline, "escrow: deadline not reached"
    if job.state == ST_POSTED:
        assert block.timestamp >= job.changed_at + 2 * REVIEW_SECONDS, "escrow: the posted list is under review"
    elif job.state == ST_DISPUTED:
        assert block.timestamp >= job.changed_at + REVIEW_SECONDS, "escrow: the dispute is being answered"
    self._refund(job_id, False)


@external
@nonreentrant
def release(job_id: uint256):
    """
    @dev The operator gives up its claim (job canceled or failed): full refund, before the deadline.
    """
    assert msg.sender == OPERATOR, "escrow: only the operator releases"
    self._refund(job_id, True)


@internal
def _withdraw(account: address):
    amount: uint256 = self.credit[account]
    assert amount > 0, "escrow: nothing to withdraw"
    self.credit[account] = 0
    assert extcall TOKEN.transfer(account, amount, default_return_value=True), "escrow: transfer failed"
    log Withdrawn(account=account, caller=msg.sender, amount=amount)


@external
@nonreentrant
def withdraw():
    """
    @dev Pull the caller's credited tokens.
    """
    self._withdraw(msg.sender)


@external
@nonreentrant
def withdraw_for(account: address):
    """
    @dev Push `account`'s credited tokens to `account` itself (anyone may pay the gas for it).
    """
    self._withdraw(account)


@external
@view
def domain_separator() -> bytes32:
    return eip712_domain_separator._domain_separator_v4()
