"""What a creator's own wallet signs, built and checked the same way by the coordinator, the CLI and the page.

* **Sign-In with Ethereum** (EIP-4361): the message that links a wallet address to a farm account. The
  coordinator issues it with a single-use nonce (:func:`siwe_message`), the wallet signs it with
  ``personal_sign`` (EIP-191), and :func:`siwe_verify` checks every field against what was issued before it
  recovers the signer. The statement names the account, so a signature made for one account cannot link
  the wallet to another.
* **EIP-712 typed data** of the escrow's ``Approve(jobId, round, payoutsHash)`` and ``Reject(jobId, round,
  reasonHash)`` (:func:`approve_typed`, :func:`reject_typed`): the exact JSON a wallet's
  ``eth_signTypedData_v4`` takes, whose domain is the escrow contract on its chain. The escrow checks the
  signature itself (``approve_by_sig``); :func:`recover_typed` lets the coordinator refuse a forged or stale
  one before it spends gas relaying it.

Signatures are 65 bytes (r, s, v) given as 0x-hex. Every parser here refuses what it does not expect with a
:class:`SignatureError` that says what to do.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

from eth_utils import is_hex_address, to_checksum_address


def _account():
    """eth_account, imported when a signature is made or checked: importing it takes ~0.75 s (py_ecc's
    pairing tables), which every `farm` command, `farm worker` included, paid at start for nothing."""
    from eth_account import Account, messages
    return Account, messages

EIP712_DOMAIN = ("RenderhiveEscrow", "1")
DOMAIN_TYPE = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
               {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}]
APPROVE_TYPES = {"Approve": [{"name": "jobId", "type": "uint256"}, {"name": "round", "type": "uint256"},
                             {"name": "payoutsHash", "type": "bytes32"}]}
REJECT_TYPES = {"Reject": [{"name": "jobId", "type": "uint256"}, {"name": "round", "type": "uint256"},
                           {"name": "reasonHash", "type": "bytes32"}]}
SIWE_TTL = 600.0          # seconds a link message may be signed in
MAX_SIWE_MESSAGE = 2048   # characters: a SIWE message of ours is ~400
MAX_SIGNATURE = 200       # characters of a 0x-hex signature (65 bytes are 132)


class SignatureError(ValueError):
    """A signature or signed message that cannot be accepted; the message says what to do."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def checksum(address: str) -> str:
    if not isinstance(address, str) or not is_hex_address(address):
        raise SignatureError(f"{str(address)[:60]!r} is not an address (0x and 40 hex digits)")
    return to_checksum_address(address)


def signature_bytes(signature: str) -> bytes:
    """A 0x-hex 65-byte signature as bytes."""
    if not isinstance(signature, str) or len(signature) > MAX_SIGNATURE or not re.fullmatch(r"0x[0-9a-fA-F]{130}", signature):
        raise SignatureError("the signature must be 65 bytes as 0x-hex (132 characters), as the wallet returns it")
    return bytes.fromhex(signature[2:])


# ------------------------------------------------------------------ Sign-In with Ethereum (EIP-4361)
def siwe_message(*, domain: str, uri: str, address: str, account: str, chain_id: int, nonce: str,
                 issued_at: float | None = None, ttl: float = SIWE_TTL) -> str:
    issued_at = time.time() if issued_at is None else issued_at
    return (f"{domain} wants you to sign in with your Ethereum account:\n{checksum(address)}\n\n"
            f"Link this wallet to the Renderhive account {account!r}: its jobs are paid from it and approved "
            f"only by its signatures.\n\n"
            f"URI: {uri}\nVersion: 1\nChain ID: {int(chain_id)}\nNonce: {nonce}\n"
            f"Issued At: {_iso(issued_at)}\nExpiration Time: {_iso(issued_at + ttl)}")


_SIWE = re.compile(
    r"(?P<domain>[^\s]+) wants you to sign in with your Ethereum account:\n(?P<address>0x[0-9a-fA-F]{40})\n\n"
    r"(?P<statement>[^\n]*)\n\nURI: (?P<uri>[^\n]+)\nVersion: 1\nChain ID: (?P<chain_id>\d+)\n"
    r"Nonce: (?P<nonce>[0-9A-Za-z]{8,64})\nIssued At: (?P<issued>[0-9T:\-Z]+)\nExpiration Time: (?P<expires>[0-9T:\-Z]+)")


def siwe_fields(message: str) -> dict[str, Any]:
    """The fields of a SIWE message of ours; :class:`SignatureError` when it is not one."""
    if not isinstance(message, str) or len(message) > MAX_SIWE_MESSAGE:
        raise SignatureError("not a sign-in message: ask for one with POST /api/wallet/challenge")
    m = _SIWE.fullmatch(message)
    if m is None:
        raise SignatureError("not a sign-in message issued by this farm: ask for one with POST /api/wallet/challenge "
                             "and sign it unchanged")
    try:
        issued, expires = _parse_iso(m["issued"]), _parse_iso(m["expires"])
    except ValueError:
        raise SignatureError("the sign-in message's times are not ISO 8601 UTC") from None
    return {"domain": m["domain"], "address": checksum(m["address"]), "statement": m["statement"],
            "uri": m["uri"], "chain_id": int(m["chain_id"]), "nonce": m["nonce"], "issued_at": issued,
            "expires_at": expires}


def siwe_verify(message: str, signature: str, *, expected: str, now: float | None = None) -> str:
    """The address that signed ``message``, which must be exactly the ``expected`` message issued (so domain,
    account, chain and nonce are all the farm's) and not expired; :class:`SignatureError` otherwise."""
    now = time.time() if now is None else now
    fields = siwe_fields(message)
    if message != expected:
        raise SignatureError("this sign-in message is not the one issued for its nonce: sign the message "
                             "POST /api/wallet/challenge returned, unchanged")
    if now > fields["expires_at"]:
        raise SignatureError("the sign-in message expired: ask for a new one (POST /api/wallet/challenge)")
    try:
        Account, messages = _account()
        signer = Account.recover_message(messages.encode_defunct(text=message), signature=signature_bytes(signature))
    except SignatureError:
        raise
    except Exception:
        raise SignatureError("the signature does not verify: sign the message with personal_sign") from None
    if signer.lower() != fields["address"].lower():
        raise SignatureError(f"the message was signed by {signer}, not by {fields['address']} it names: sign it "
                             "with the wallet it names")
    return fields["address"]


# ------------------------------------------------------------------ EIP-712: the escrow's approvals
def _typed(types: dict, message: dict, chain_id: int, escrow: str) -> dict[str, Any]:
    primary = next(iter(types))
    return {"types": {"EIP712Domain": DOMAIN_TYPE, **types}, "primaryType": primary,
            "domain": {"name": EIP712_DOMAIN[0], "version": EIP712_DOMAIN[1], "chainId": int(chain_id),
                       "verifyingContract": checksum(escrow)},
            "message": message}


def _b32(h: str) -> str:
    if not isinstance(h, str) or not re.fullmatch(r"0x[0-9a-fA-F]{64}", h):
        raise SignatureError(f"{str(h)[:80]!r} is not a 32-byte hash (0x and 64 hex digits)")
    return h.lower()


def approve_typed(chain_id: int, escrow: str, job: int, round_: int, payouts_hash: str) -> dict[str, Any]:
    """The typed data of the escrow's Approve(jobId, round, payoutsHash), for eth_signTypedData_v4."""
    return _typed(APPROVE_TYPES, {"jobId": str(int(job)), "round": int(round_), "payoutsHash": _b32(payouts_hash)},
                  chain_id, escrow)


def reject_typed(chain_id: int, escrow: str, job: int, round_: int, reason_hash: str) -> dict[str, Any]:
    """The typed data of the escrow's Reject(jobId, round, reasonHash), for eth_signTypedData_v4."""
    return _typed(REJECT_TYPES, {"jobId": str(int(job)), "round": int(round_), "reasonHash": _b32(reason_hash)},
                  chain_id, escrow)


def _for_eth_account(data: dict[str, Any]) -> dict[str, Any]:
    """eth_account wants uint256 as ints and bytes32 as bytes; wallets take the JSON as given."""
    msg = dict(data["message"])
    for f in data["types"][data["primaryType"]]:
        if f["type"] == "uint256":
            msg[f["name"]] = int(msg[f["name"]])
        elif f["type"] == "bytes32":
            msg[f["name"]] = bytes.fromhex(msg[f["name"]][2:])
    return {**data, "message": msg}


def sign_typed(key: str, data: dict[str, Any]) -> str:
    """Sign typed data with a private key (the CLI's ``--key-file``; tests): the wallet's signature."""
    Account, _ = _account()
    return "0x" + bytes(Account.sign_typed_data(key, full_message=_for_eth_account(data)).signature).hex()


def recover_typed(data: dict[str, Any], signature: str) -> str:
    """The address that signed the typed data; :class:`SignatureError` when the signature is malformed."""
    sig = signature_bytes(signature)
    try:
        Account, messages = _account()
        return Account.recover_message(messages.encode_typed_data(full_message=_for_eth_account(data)), signature=sig)
    except Exception:
        raise SignatureError("the signature does not verify against this typed data: sign it with "
                             "eth_signTypedData_v4") from None


def sign_message(key: str, message: str) -> str:
    """personal_sign with a private key (the CLI's ``farm wallet link --key-file``)."""
    Account, messages = _account()
    return "0x" + bytes(Account.sign_message(messages.encode_defunct(text=message), private_key=key).signature).hex()
