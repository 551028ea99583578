"""Chain access: the only module of the farm that imports web3 (and the eth_* libraries under it).

It compiles the Vyper contracts in ``contracts/`` (at run time, cached by source hash under
``build/contracts/``, which git ignores), connects to a chain — an in-process EVM (eth-tester on py-evm,
the embedded default) or any EVM node by JSON-RPC (``--chain-rpc URL`` with the operator's key file) —
deploys or attaches to the token and escrow, and offers what the ledger needs in plain Python types:
signed transactions, broadcasts, receipts, views, escrow events and EIP-712 approval signatures.

Invariants:

* Transactions are signed here and handed back as :class:`SignedTx` *before* they are broadcast, so the
  ledger can persist the exact bytes first; broadcasting the same bytes again is always safe (same hash,
  same nonce: a node either knows it, mined it, or takes it).
* Every failure to reach the node raises :class:`ChainUnavailable` (retry later, nothing changed); a
  transaction the contract would refuse raises :class:`TxRejected` at signing time (pre-flight
  ``eth_estimateGas``), so a refused action is never broadcast.
* One lock serialises all access: eth-tester is not thread-safe, and the settler thread and the API's
  threads both read the chain.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_utils import is_address, keccak, to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception

from common import eth_sign

try:  # the in-process EVM reports reverts with its own exception type
    from eth_tester.exceptions import TransactionFailed as _TesterRevert
except ImportError:  # pragma: no cover - eth-tester is a dependency, but only the embedded chain needs it
    _TesterRevert = ContractLogicError
REVERTS = (ContractLogicError, _TesterRevert)

REPO = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO / "contracts"
BUILD_DIR = Path(os.environ.get("RENDERHIVE_CONTRACT_CACHE") or REPO / "build" / "contracts")

# Escrow job states, as numbered in contracts/JobEscrow.vy.
class EscrowState(str, enum.Enum):
    """A job's state in the JobEscrow contract (its ``jobs(key).state``, 0-5)."""
    none = "none"
    open = "open"
    posted = "posted"
    disputed = "disputed"
    approved = "approved"
    refunded = "refunded"


STATE_NAMES = {i: s.value for i, s in enumerate(EscrowState)}
EIP712_DOMAIN = eth_sign.EIP712_DOMAIN
DEV_ETH = 10 * 10**18  # gas money given to each custodial dev wallet


class ChainUnavailable(RuntimeError):
    """The node could not be reached or did not answer; nothing was changed. Retry later."""


class TxRejected(RuntimeError):
    """The contract refuses the transaction (pre-flight); the message carries its revert reason."""


@dataclass(frozen=True)
class SignedTx:
    sender: str
    nonce: int
    tx_hash: str
    raw: str


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    ok: bool
    block: int
    gas_used: int


@dataclass(frozen=True)
class EscrowJob:
    creator: str
    state: str
    deposit: int
    deadline: int
    round: int
    payouts_hash: str
    payout_total: int
    fee: int
    changed_at: int = 0  # when the list was last posted or disputed: the review window runs from it
    disputes: int = 0


@dataclass(frozen=True)
class Event:
    name: str
    args: dict[str, Any]
    tx_hash: str
    block: int
    log_index: int


# ------------------------------------------------------------------ compiling
def _search_paths() -> list[Path]:
    return [CONTRACTS_DIR] + [Path(p) for p in reversed(sys.path) if p and Path(p).is_dir()]


def compile_contract(name: str, contracts_dir: Path = CONTRACTS_DIR, cache_dir: Path | None = None) -> dict:
    """ABI and bytecode of ``contracts_dir/name.vy``, compiled with the vyper package and cached under
    ``cache_dir`` by the hash of the source and the compiler and library versions."""
    import importlib.metadata as md

    import vyper
    from vyper.compiler.input_bundle import FilesystemInputBundle

    src_path = Path(contracts_dir) / f"{name}.vy"
    source = src_path.read_text()
    key = hashlib.sha256(f"{vyper.__version__}|{md.version('snekmate')}|".encode() + source.encode()).hexdigest()
    cache = Path(cache_dir or BUILD_DIR) / f"{name}-{key[:16]}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    bundle = FilesystemInputBundle([Path(contracts_dir), *_search_paths()])
    out = vyper.compile_code(source, contract_path=src_path.name, input_bundle=bundle,
                             output_formats=["abi", "bytecode"])
    art = {"name": name, "source_sha256": key, "abi": out["abi"], "bytecode": out["bytecode"]}
    try:  # atomic: concurrent compilers (parallel tests) never see half a file
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(art, f)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only checkout still works, it just compiles every time
    return art


# ------------------------------------------------------------------ keys and hashes
def address_of(key: str) -> str:
    return Account.from_key(key).address


def derive_key(seed: bytes, label: str) -> str:
    """A private key derived from a secret seed and a label (custodial dev wallets)."""
    return "0x" + keccak(seed + b"|" + label.encode()).hex()


def new_key() -> str:
    return "0x" + os.urandom(32).hex()


def checksum(address: str) -> str | None:
    """The checksummed form of ``address``, or None when it is not an address."""
    return to_checksum_address(address) if isinstance(address, str) and is_address(address) else None


def payouts_hash(workers: list[str], amounts: list[int]) -> str:
    """keccak256(abi_encode(workers, amounts)) exactly as JobEscrow computes it."""
    return "0x" + keccak(abi_encode(["address[]", "uint256[]"], [workers, amounts])).hex()


def text_hash(text: str) -> str:
    return "0x" + keccak(text.encode()).hex()


def job_key(namespace: str, job_id: int | str) -> int:
    """The escrow's uint256 job id of a farm job: unique per farm instance (its namespace). A job whose id
    was taken by someone else's deposit re-keys with ``"{job_id}:{old key}"``."""
    return int.from_bytes(keccak(f"renderhive:{namespace}:{job_id}".encode()), "big")


# ------------------------------------------------------------------ the chain
class Chain:
    """A connection to one chain, with the token and escrow once :meth:`attach` or :meth:`deploy` ran."""

    def __init__(self, w3: Web3, operator_key: str, *, embedded: bool, dev: bool, backend: Any = None):
        self.w3 = w3
        self.operator_key = operator_key
        self.operator = address_of(operator_key)
        self.embedded = embedded
        self.dev = dev  # a dev chain: time can be moved, test ETH exists
        self.backend = backend
        self.lock = threading.RLock()
        self.token = None
        self.escrow = None
        self._topics: dict[bytes, Any] = {}
        self._chain_id: int | None = None
        self._views: dict[tuple[str, str], tuple[bytes, list[str], list[str], list[dict]]] = {}

    # ---- construction
    @classmethod
    def embedded_evm(cls) -> "Chain":
        """An in-process EVM (eth-tester, py-evm); the operator is its first prefunded dev account."""
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider
        from farm.payments import evm_gas
        backend = PyEVMBackend()
        evm_gas.install(backend)  # one run per estimate, not a 13-run search (farm/payments/evm_gas.py)
        w3 = Web3(EthereumTesterProvider(EthereumTester(backend)))
        key = "0x" + backend.account_keys[0].to_bytes().hex()
        # views and estimates without a "from" get the operator's: else eth-tester's guess_from middleware
        # lists (and checksums) every dev account on each call, ~1.5 ms a view
        w3.eth.default_account = address_of(key)
        return cls(w3, key, embedded=True, dev=True, backend=backend)

    @classmethod
    def connect(cls, url: str, operator_key: str, timeout: float = 10.0, dev: bool | None = None) -> "Chain":
        """A JSON-RPC node. ``dev``: whether it is a dev node (anvil, hardhat); asked when None."""
        from web3 import HTTPProvider
        w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}))
        chain = cls(w3, operator_key, embedded=False, dev=bool(dev))
        if dev is None:
            try:
                chain.dev = chain._io(lambda: w3.eth.chain_id) == 31337
            except ChainUnavailable:
                chain.dev = False
        return chain

    def _io(self, fn: Callable[[], Any]) -> Any:
        """Run one node interaction under the lock; connection problems become ChainUnavailable."""
        with self.lock:
            try:
                return fn()
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                    TimeoutError, OSError) as exc:
                raise ChainUnavailable(f"chain node unreachable: {exc}") from None
            except Web3Exception as exc:
                if "connect" in str(exc).lower():
                    raise ChainUnavailable(f"chain node unreachable: {exc}") from None
                raise

    # ---- identity
    def chain_id(self) -> int:
        if self._chain_id is None:  # never changes for a connection; asked once
            self._chain_id = self._io(lambda: self.w3.eth.chain_id)
        return self._chain_id

    def genesis_hash(self) -> str:
        return self._io(lambda: self.w3.eth.get_block(0)["hash"].to_0x_hex())

    def block_number(self) -> int:
        return self._io(lambda: self.w3.eth.block_number)

    def timestamp(self) -> int:
        return self._io(lambda: self.w3.eth.get_block("latest")["timestamp"])

    def has_code(self, address: str) -> bool:
        return bool(self._io(lambda: self.w3.eth.get_code(to_checksum_address(address))))

    # ---- contracts
    def _contract(self, name: str, address: str | None = None):
        art = compile_contract(name)
        if address is None:
            return self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        return self.w3.eth.contract(address=to_checksum_address(address), abi=art["abi"])

    def attach(self, token: str, escrow: str) -> None:
        self.token = self._contract("RenderToken", token)  # the ERC-20 part of its ABI fits any token
        self.escrow = self._contract("JobEscrow", escrow)
        self._topics = {}
        for ev in self.escrow.abi:
            if ev["type"] == "event":
                sig = f"{ev['name']}({','.join(i['type'] for i in ev['inputs'])})"
                self._topics[keccak(sig.encode())] = getattr(self.escrow.events, ev["name"])()

    def escrow_terms(self) -> tuple[str, str, int]:
        """The attached escrow's (token, operator, review seconds), as its code says: an escrow at the right
        address but over another token, run by another operator, or with another review window, is not ours.
        Code that answers none of them (an older escrow) counts as another escrow."""
        def read():
            f = self.escrow.functions
            return f.TOKEN().call(), f.OPERATOR().call(), f.REVIEW_SECONDS().call()
        try:
            return self._io(read)
        except REVERTS:
            return "", "", 0

    def deploy_contract(self, name: str, *args, key: str | None = None, contracts_dir: Path = CONTRACTS_DIR):
        """Deploy ``contracts_dir/name.vy`` with constructor ``args``; returns (address, receipt)."""
        art = compile_contract(name, contracts_dir)
        factory = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        rcpt = self.wait(self.sign(key or self.operator_key, factory.constructor(*args)))
        return rcpt["contractAddress"], rcpt

    def deploy(self, token: str | None, fee_bps: int, review_seconds: int) -> dict[str, Any]:
        """Deploy the escrow (and a RenderToken when no token address is given); wait for both."""
        dev_token = token is None
        if dev_token:
            token, _ = self.deploy_contract("RenderToken", "Renderhive Token", "RNDR")
        escrow, rcpt = self.deploy_contract("JobEscrow", to_checksum_address(token), self.operator, fee_bps,
                                            review_seconds)
        self.attach(token, escrow)
        return {"token": to_checksum_address(token), "escrow": escrow, "dev_token": dev_token,
                "deploy_block": rcpt["blockNumber"], "fee_bps": fee_bps, "operator": self.operator,
                "review_seconds": review_seconds}

    def wait(self, tx: SignedTx, timeout: float = 60.0):
        self.broadcast(tx)
        rcpt = self._io(lambda: self.w3.eth.wait_for_transaction_receipt(tx.tx_hash, timeout=timeout,
                                                                          poll_latency=0.05))
        if rcpt.status != 1:
            raise TxRejected(f"transaction {tx.tx_hash} reverted")
        return rcpt

    # ---- transactions
    def sign(self, key: str, call=None, *, to: str | None = None, value: int = 0, nonce: int | None = None) -> SignedTx:
        """Build, pre-flight (estimate gas: raises TxRejected on a revert) and sign a transaction from
        ``key``: a contract call/constructor, or a plain transfer of ``value`` wei to ``to``."""
        sender = address_of(key)

        def build():
            n = self.w3.eth.get_transaction_count(sender, "pending") if nonce is None else nonce
            base = {"from": sender, "nonce": n, "value": value, "chainId": self.chain_id(),
                    "gasPrice": self.w3.eth.gas_price * 3 // 2 + 1}  # headroom: the base fee may rise meanwhile
            if call is not None:
                tx = call.build_transaction({**base, "gas": 1})  # gas filled below
                tx.pop("maxFeePerGas", None)
                tx.pop("maxPriorityFeePerGas", None)
                tx["gasPrice"] = base["gasPrice"]
            else:
                tx = {**base, "to": to_checksum_address(to), "gas": 21000}
            if call is not None:
                est = {k: v for k, v in tx.items() if k in ("from", "to", "data", "value")}
                tx["gas"] = int(self.w3.eth.estimate_gas(est) * 1.25) + 20000
            return tx
        try:
            tx = self._io(build)
        except REVERTS as exc:
            raise TxRejected(str(getattr(exc, "message", None) or exc).replace("execution reverted: ", "")) from None
        signed = Account.sign_transaction(tx, key)
        return SignedTx(sender, tx["nonce"], signed.hash.to_0x_hex(), signed.raw_transaction.to_0x_hex())

    def broadcast(self, tx: SignedTx) -> None:
        """Send the signed bytes. Idempotent: a transaction the node already has or has mined is fine."""
        def send():
            try:
                self.w3.eth.send_raw_transaction(tx.raw)
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError):
                raise
            except Exception as exc:  # nodes word these differently (eth-tester raises its own types)
                msg = str(exc).lower()
                if "already known" in msg or "known transaction" in msg or "already imported" in msg:
                    return
                if self._receipt(tx.tx_hash) is not None:
                    return  # mined already (the node answers "nonce too low")
                raise TxRejected(f"node refused {tx.tx_hash}: {exc}") from None
        self._io(send)

    def _receipt(self, tx_hash: str):
        try:
            return self.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None

    def receipt(self, tx_hash: str) -> Receipt | None:
        r = self._io(lambda: self._receipt(tx_hash))
        if r is None:
            return None
        return Receipt(tx_hash, r.status == 1, r.blockNumber, r.gasUsed)

    def knows(self, tx_hash: str) -> bool:
        """Whether the node has the transaction (pending or mined)."""
        def get():
            try:
                self.w3.eth.get_transaction(tx_hash)
                return True
            except TransactionNotFound:
                return False
        return self._io(get)

    def nonce(self, address: str, pending: bool = True) -> int:
        return self._io(lambda: self.w3.eth.get_transaction_count(to_checksum_address(address),
                                                                  "pending" if pending else "latest"))

    # ---- calls the ledger signs (contract functions, built but unsent: ``sign`` them, store, broadcast).
    # Typed, one per contract function the farm uses: no contract method name is a string outside this module.
    def mint(self, to: str, amount: int):
        """RenderToken.mint (dev chains: the demo's custodial wallets are funded with it)."""
        return self.token.functions.mint(to, amount)

    def approve_spend(self, spender: str, amount: int):
        """RenderToken.approve: let ``spender`` (the escrow) take ``amount`` from the signer."""
        return self.token.functions.approve(spender, amount)

    def transfer(self, to: str, amount: int):
        return self.token.functions.transfer(to, amount)

    def open_job(self, job: int, deposit: int, deadline: int):
        """JobEscrow.open_job: the creator deposits ``deposit`` for ``job`` until ``deadline``."""
        return self.escrow.functions.open_job(job, deposit, deadline)

    def post_payouts(self, job: int, wallets: list[str], amounts: list[int]):
        """JobEscrow.post_payouts (operator): the round's payout list (its hash is stored)."""
        return self.escrow.functions.post_payouts(job, wallets, amounts)

    def approve(self, job: int, wallets: list[str], amounts: list[int]):
        """JobEscrow.approve: the creator approves the posted list from their own wallet."""
        return self.escrow.functions.approve(job, wallets, amounts)

    def approve_by_sig(self, job: int, wallets: list[str], amounts: list[int], sig: bytes):
        """JobEscrow.approve_by_sig: a relayed EIP-712 approval signed by the creator."""
        return self.escrow.functions.approve_by_sig(job, wallets, amounts, sig)

    def settle_unreviewed(self, job: int, wallets: list[str], amounts: list[int]):
        """JobEscrow.settle_unreviewed (operator): a posted list the creator left unreviewed past the window."""
        return self.escrow.functions.settle_unreviewed(job, wallets, amounts)

    def reject_by_sig(self, job: int, reason: bytes, sig: bytes):
        """JobEscrow.reject_by_sig: a relayed EIP-712 rejection signed by the creator."""
        return self.escrow.functions.reject_by_sig(job, reason, sig)

    def release(self, job: int):
        """JobEscrow.release (operator): a canceled or failed job's deposit back to its creator."""
        return self.escrow.functions.release(job)

    def refund(self, job: int):
        """JobEscrow.refund (creator): the deposit back after the deadline."""
        return self.escrow.functions.refund(job)

    def withdraw(self):
        """JobEscrow.withdraw: the signer's credit to the signer."""
        return self.escrow.functions.withdraw()

    def withdraw_for(self, address: str):
        """JobEscrow.withdraw_for (anyone): ``address``'s credit to ``address``."""
        return self.escrow.functions.withdraw_for(address)

    # ---- calls a creator's own wallet sends (the farm builds the calldata; the wallet shows and signs it)
    def deposit_calls(self, job: int, deposit: int, deadline: int) -> list[dict[str, str]]:
        """The two transactions of a deposit from the creator's own wallet: the token allowance, then
        open_job; as eth_sendTransaction params (``to``, ``data``, ``value``)."""
        escrow = self.escrow.address
        return [{"to": self.token.address, "data": self.token.encode_abi("approve", args=[escrow, deposit]),
                 "value": "0x0", "what": f"let the escrow {escrow} take the deposit"},
                {"to": escrow, "data": self.escrow.encode_abi("open_job", args=[job, deposit, deadline]),
                 "value": "0x0", "what": f"deposit into escrow job {job} until {deadline}"}]

    # ---- views
    def _view(self, contract, fn: str, *args) -> Any:
        """``contract.fn(*args)`` read at the latest block, as web3's ``.call()`` returns it (one output: the
        value; several: a list; addresses checksummed). On the embedded EVM the call data is encoded once per
        function and the call goes straight to eth-tester: web3's contract-call path (ABI matching,
        normalizers, middleware) cost ~2-3 ms of a ~4 ms view, and a deposit reads five."""
        if not self.embedded:
            return self._io(lambda: contract.functions[fn](*args).call())
        key = (contract.address, fn)
        if key not in self._views:
            abi = next(e for e in contract.abi if e.get("type") == "function" and e.get("name") == fn)
            ins = [_abi_type(i) for i in abi.get("inputs", [])]
            outs = abi.get("outputs", [])
            self._views[key] = (keccak(text=f"{fn}({','.join(ins)})")[:4], ins, [_abi_type(o) for o in outs], outs)
        selector, ins, out_types, outs = self._views[key]
        data = "0x" + (selector + abi_encode(ins, list(args))).hex()
        tester = self.w3.provider.ethereum_tester
        raw = self._io(lambda: tester.call({"from": self.operator, "to": contract.address, "data": data}, "latest"))
        values = abi_decode(out_types, bytes.fromhex(raw[2:]))
        out = [_checksummed(o, v) for o, v in zip(outs, values)]
        return out[0] if len(out) == 1 else out

    def token_balance(self, address: str) -> int:
        return self._view(self.token, "balanceOf", to_checksum_address(address))

    def eth_balance(self, address: str) -> int:
        return self._io(lambda: self.w3.eth.get_balance(to_checksum_address(address)))

    def credit(self, address: str) -> int:
        return self._view(self.escrow, "credit", to_checksum_address(address))

    def allowance(self, owner: str) -> int:
        return self._view(self.token, "allowance", to_checksum_address(owner), self.escrow.address)

    def escrow_job(self, key: int) -> EscrowJob:
        j = self._view(self.escrow, "jobs", key)
        return EscrowJob(j[0], STATE_NAMES.get(j[1], str(j[1])), j[2], j[3], j[4], "0x" + bytes(j[5]).hex(),
                         j[6], j[7], j[8], j[9])

    def events(self, from_block: int, to_block: int) -> list[Event]:
        """The escrow's events in [from_block, to_block], decoded, in chain order."""
        logs = self._io(lambda: self.w3.eth.get_logs({"address": self.escrow.address, "fromBlock": from_block,
                                                      "toBlock": to_block}))
        out = []
        for log in logs:
            ev = self._topics.get(bytes(log["topics"][0])) if log["topics"] else None
            if ev is None:
                continue
            d = ev.process_log(log)
            args = {k: ("0x" + bytes(v).hex() if isinstance(v, bytes) else list(v) if isinstance(v, (list, tuple))
                        else v) for k, v in d["args"].items()}
            out.append(Event(d["event"], args, log["transactionHash"].to_0x_hex(), log["blockNumber"],
                             log["logIndex"]))
        return out

    # ---- EIP-712 signatures of the creator (custodial wallets; built as in common.eth_sign, as wallets do)
    def sign_approve(self, key: str, job: int, round_: int, payouts_hash_: str) -> bytes:
        data = eth_sign.approve_typed(self.chain_id(), self.escrow.address, job, round_, payouts_hash_)
        return bytes.fromhex(eth_sign.sign_typed(key, data)[2:])

    def sign_reject(self, key: str, job: int, round_: int, reason_hash: str) -> bytes:
        data = eth_sign.reject_typed(self.chain_id(), self.escrow.address, job, round_, reason_hash)
        return bytes.fromhex(eth_sign.sign_typed(key, data)[2:])

    # ---- dev chains only
    def advance_time(self, seconds: int) -> None:
        """Move the chain's clock forward (dev chains: eth-tester or anvil)."""
        if not self.dev:
            raise RuntimeError("only a dev chain's clock can be moved")
        if self.backend is not None:
            with self.lock:
                # the new block must be later than the newest one, which may run ahead of the wall clock
                self.backend.time_travel(self.timestamp() + max(2, int(seconds)))
        else:
            self._io(lambda: (self.w3.provider.make_request("evm_increaseTime", [int(seconds)]),
                              self.w3.provider.make_request("evm_mine", [])))


def _abi_type(param: dict) -> str:
    """The canonical ABI type of one input or output (tuples spelled out)."""
    t = param["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + t[len("tuple"):]
    return t


def _checksummed(param: dict, value: Any) -> Any:
    """A decoded value of ABI ``param`` as web3 returns it: addresses checksummed, in tuples and arrays too."""
    t = param["type"]
    if t.endswith("]"):
        inner = {**param, "type": t[:t.rindex("[")]}
        return [_checksummed(inner, v) for v in value]
    if t == "tuple":
        return tuple(_checksummed(c, v) for c, v in zip(param["components"], value))
    return to_checksum_address(value) if t == "address" else value


def read_key_file(path: str | Path) -> str:
    """A hex private key from a file (one line, with or without 0x); say what is wrong otherwise."""
    raw = Path(path).read_text().strip()
    key = raw if raw.startswith("0x") else "0x" + raw
    try:
        Account.from_key(key)
    except Exception:
        raise ValueError(f"{path} does not hold a hex private key (64 hex digits, optional 0x)") from None
    return key
