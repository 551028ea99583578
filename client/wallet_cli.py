"""A creator's own wallet on the CLI: link it, deposit from it, approve and reject by its signatures; and a
worker owner's check, on their own node, of what the escrow credited them.

Signing happens here, never on the coordinator: ``--key-file K`` (a hex private key, mode 600) signs in
process; ``--sign-command CMD`` hands the request to an external signer (a hardware wallet's or a remote
signer's wrapper) — CMD gets one JSON object on stdin, ``{"method": "personal_sign" | "eth_signTypedData_v4",
"address": "0x…", "data": <the message text or the typed data>}``, and prints the 0x-hex signature on stdout.
Deposits are transactions, so they need the key and a node: ``farm deposit JOB --key-file K --rpc URL``.

Registered by :func:`client.payments_cli.add_commands`. Everything the farm is asked goes through
:meth:`client.api.Client.request`; what is signed is built by :mod:`common.eth_sign`, as the coordinator
checks it.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from client.api import ApiError, Client
from common import eth_sign


class Signer:
    """The creator's wallet on this machine: a key file, or an external signing command."""

    def __init__(self, key_file: str | None = None, command: str | None = None, address: str | None = None):
        if bool(key_file) == bool(command):
            raise ApiError("sign with exactly one of --key-file K (a hex private key) or --sign-command CMD")
        self.key = self.command = None
        if key_file:
            from eth_account import Account
            raw = Path(key_file).read_text().strip()
            self.key = raw if raw.startswith("0x") else "0x" + raw
            try:
                self.address = Account.from_key(self.key).address
            except Exception:
                raise ApiError(f"{key_file} does not hold a hex private key (64 hex digits, optional 0x)") from None
        else:
            if not address:
                raise ApiError("--sign-command needs --address 0x… (the wallet it signs for)")
            self.command, self.address = command, eth_sign.checksum(address)

    def _external(self, method: str, data: Any) -> str:
        req = json.dumps({"method": method, "address": self.address, "data": data})
        try:
            out = subprocess.run(shlex.split(self.command), input=req, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ApiError(f"the signing command failed to run: {exc}") from None
        if out.returncode != 0:
            raise ApiError(f"the signing command exited {out.returncode}: {out.stderr.strip()[-300:]}")
        return out.stdout.strip()

    def sign_message(self, text: str) -> str:
        return eth_sign.sign_message(self.key, text) if self.key else self._external("personal_sign", text)

    def sign_typed(self, data: dict[str, Any]) -> str:
        return eth_sign.sign_typed(self.key, data) if self.key else self._external("eth_signTypedData_v4", data)


def signer_of(args) -> Signer | None:
    if not (getattr(args, "key_file", None) or getattr(args, "sign_command", None)):
        return None
    return Signer(args.key_file, args.sign_command, getattr(args, "signer_address", None))


def link(client: Client, signer: Signer) -> dict[str, Any]:
    ch = client.request("POST", "/api/wallet/challenge", {"address": signer.address})
    return client.request("POST", "/api/wallet/link", {"message": ch["message"],
                                                       "signature": signer.sign_message(ch["message"])})


def approval(client: Client, job_id: int, wait: float = 60.0) -> dict[str, Any]:
    """The typed data to sign, waiting while the payout list is not on chain yet (409)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return client.request("GET", f"/api/jobs/{int(job_id)}/approval")
        except ApiError as exc:
            if exc.status != 409 or "not on chain yet" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def approve_signed(client: Client, job_id: int, signer: Signer) -> dict[str, Any]:
    req = approval(client, job_id)
    if req["signer"].lower() != signer.address.lower():
        raise ApiError(f"job {job_id} is paid from {req['signer']}, not from {signer.address}: sign with that wallet")
    return client.request("POST", f"/api/jobs/{int(job_id)}/approve", {"signature": signer.sign_typed(req["typed_data"])})


def reject_signed(client: Client, job_id: int, frames: str, reason: str, signer: Signer) -> dict[str, Any]:
    req = client.request("POST", f"/api/jobs/{int(job_id)}/rejection", {"frames": frames, "reason": reason})
    return client.request("POST", f"/api/jobs/{int(job_id)}/reject",
                          {"frames": frames, "reason": reason, "signature": signer.sign_typed(req["typed_data"])})


def deposit(client: Client, job_id: int, signer: Signer, rpc: str, timeout: float = 120.0) -> list[str]:
    """Send the deposit's transactions from the key through the node at ``rpc``; their hashes."""
    if signer.key is None:
        raise ApiError("a deposit is a transaction: farm deposit needs --key-file (or deposit on the job page)")
    from eth_account import Account
    from web3 import Web3
    terms = client.request("GET", f"/api/jobs/{int(job_id)}/deposit")
    if terms["from"].lower() != signer.address.lower():
        raise ApiError(f"job {job_id} is paid from {terms['from']}, not from {signer.address}")
    w3 = Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": 30}))
    if w3.eth.chain_id != terms["chain_id"]:
        raise ApiError(f"the node at {rpc} is chain {w3.eth.chain_id}; the farm's escrow is on chain {terms['chain_id']}")
    hashes = []
    for call in terms.get("calls", []):
        tx = {"from": signer.address, "to": Web3.to_checksum_address(call["to"]), "data": call["data"], "value": 0,
              "nonce": w3.eth.get_transaction_count(signer.address, "pending"), "chainId": terms["chain_id"],
              "gasPrice": w3.eth.gas_price}
        tx["gas"] = int(w3.eth.estimate_gas(tx) * 1.2)
        h = w3.eth.send_raw_transaction(Account.sign_transaction(tx, signer.key).raw_transaction)
        rcpt = w3.eth.wait_for_transaction_receipt(h, timeout=timeout)
        if rcpt.status != 1:
            raise ApiError(f"{call['what']}: transaction {h.to_0x_hex()} reverted")
        hashes.append(h.to_0x_hex())
    return hashes


# ------------------------------------------------------------------ a worker's own check
ESCROW_ABI = [
    {"type": "function", "name": "credit", "stateMutability": "view", "inputs": [{"name": "a", "type": "address"}],
     "outputs": [{"name": "", "type": "uint256"}]},
    {"type": "function", "name": "TOKEN", "stateMutability": "view", "inputs": [],
     "outputs": [{"name": "", "type": "address"}]},
    {"type": "event", "name": "PayoutsPosted", "anonymous": False, "inputs": [
        {"name": "job_id", "type": "uint256", "indexed": True}, {"name": "round", "type": "uint256", "indexed": False},
        {"name": "payouts_hash", "type": "bytes32", "indexed": False}, {"name": "total", "type": "uint256", "indexed": False},
        {"name": "fee", "type": "uint256", "indexed": False}, {"name": "workers", "type": "address[]", "indexed": False},
        {"name": "amounts", "type": "uint256[]", "indexed": False}]},
    {"type": "event", "name": "JobApproved", "anonymous": False, "inputs": [
        {"name": "job_id", "type": "uint256", "indexed": True}, {"name": "round", "type": "uint256", "indexed": False},
        {"name": "total", "type": "uint256", "indexed": False}, {"name": "fee", "type": "uint256", "indexed": False},
        {"name": "remainder", "type": "uint256", "indexed": False}, {"name": "unreviewed", "type": "bool", "indexed": False}]},
]
BALANCE_ABI = [{"type": "function", "name": "balanceOf", "stateMutability": "view",
                "inputs": [{"name": "a", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]}]


def onchain_credits(rpc: str, escrow: str, address: str, from_block: int = 0) -> dict[str, Any]:
    """What the escrow at ``escrow`` credited ``address``, read from the node at ``rpc`` (not the farm's):
    each approved job's share from its events, the credit not yet withdrawn, and the token balance."""
    from web3 import Web3
    w3 = Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": 30}))
    address, escrow = eth_sign.checksum(address), eth_sign.checksum(escrow)
    if not w3.eth.get_code(escrow):
        raise ApiError(f"there is no contract at {escrow} on the node at {rpc}: check the escrow address "
                       "(the job page's Escrow contract) and the chain")
    c = w3.eth.contract(address=escrow, abi=ESCROW_ABI)
    head = w3.eth.block_number
    posted, approved = {}, {}
    for start in range(from_block, head + 1, 5000):
        end = min(head, start + 4999)
        for ev in c.events.PayoutsPosted().get_logs(from_block=start, to_block=end):
            posted[(ev.args.job_id, ev.args.round)] = dict(zip(ev.args.workers, ev.args.amounts))
        for ev in c.events.JobApproved().get_logs(from_block=start, to_block=end):
            approved[ev.args.job_id] = (ev.args.round, ev.transactionHash.to_0x_hex(), ev.args.unreviewed)
    jobs = []
    for job, (round_, tx, unreviewed) in approved.items():
        amount = next((a for w, a in posted.get((job, round_), {}).items() if w.lower() == address.lower()), 0)
        if amount:
            jobs.append({"escrow_job": str(job), "round": round_, "amount": str(amount), "tx_hash": tx,
                         "settled": "unreviewed" if unreviewed else "approved"})
    token = w3.eth.contract(address=c.functions.TOKEN().call(), abi=BALANCE_ABI)
    return {"address": address, "escrow": escrow, "block": head, "jobs": jobs,
            "credited": str(sum(int(j["amount"]) for j in jobs)),
            "escrow_credit": str(c.functions.credit(address).call()),
            "token": str(token.functions.balanceOf(address).call())}
