"""Sealed blobs: a blob encrypted once on the coordinator, so that one ciphertext serves every worker.

The worker plane is CurveZMQ, and CURVE encrypts every byte once per connection: one scene fetched by 8
workers is encrypted 8 times, and on the coordinator's side that costs ~1.3 s of CPU a GiB a worker
(bench/curve.py, bench/fanout.py). A big blob goes instead over the *sealed channel*: the coordinator
seals the blob once (AES-256-GCM, :data:`RECORD` plaintext bytes a record), keeps the sealed file, and
sends it with ``sendfile`` over plain HTTP to every worker that presents a ticket; the worker got the
ticket and the blob's key over its CurveZMQ connection (TICKET_GET → TICKET), so only workers holding a
lease of the blob can read it, and a byte changed on the wire or on the coordinator's disk fails that
record's tag.

What the worker checks its file against: the coordinator hashes the plaintext as it seals it, sha256
(checked against the blob's name before the last record is written, so a blob changed on the
coordinator's disk never completes a sealed download) and BLAKE3 (:func:`digest`), and the TICKET of a
sealed blob carries that BLAKE3 digest over CurveZMQ. The worker checks the BLAKE3 of its file against
it instead of the sha256 of the name: as strong a check of bytes that came from the coordinator (the
record tags are no such check against another holder of the blob's key, who could seal other bytes
under it: the digest is), at ~0.18 s of CPU a GiB instead of 0.64 with SHA instructions (~2 s without
them, as on many GPU hosts' CPUs). A ticket without a digest (a blob still being sealed) is followed by a
second TICKET_GET once the download ends; without a digest then, the file's sha256 is checked.

Format: the sealed file is the records one after another; record ``i`` holds plaintext bytes
``[i*RECORD, min((i+1)*RECORD, size))`` as ``ciphertext || tag`` (16 bytes), so record ``i`` starts at
``i * (RECORD + TAG)`` and a download resumes at any record (an HTTP ``Range``). Nonce: ``i`` as 12
big-endian bytes, unique under the blob's own key. Associated data: the format's name, the blob's sha256
and size, and ``i``: a record of another blob, another position, or a blob cut short never opens. A blob
of ``size`` 0 has no records.

The key of a blob is HMAC-SHA256(the coordinator's sealing secret, its sha256): one key per blob, the same
for every worker (the ciphertext must be the same), derived rather than stored. The secret is the
coordinator process's own (random at start), so a restart re-seals and old tickets and keys are void.
"""
from __future__ import annotations

import hashlib
import hmac

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

RECORD = 1024 * 1024
"""Plaintext bytes a sealed record (the last one of a blob may be shorter)."""

TAG = 16
"""Bytes of a record's GCM tag."""

MIN_BYTES = 8 * 1024 * 1024
"""Smallest blob sent over the sealed channel; smaller ones (a frame, a texture) go as BLOB chunks, where
one round trip costs less than a second connection."""

_AAD = b"renderhive-sealed-1"


class SealError(ValueError):
    """A sealed record that does not open under its key: changed on the wire or on disk, or not this
    blob's record at this position."""


def records(size: int) -> int:
    """How many records a blob of ``size`` bytes seals to."""
    return -(-size // RECORD)


def sealed_size(size: int) -> int:
    """Bytes of the sealed file of a blob of ``size`` bytes."""
    return size + records(size) * TAG


def record_offset(index: int) -> int:
    """Where record ``index`` starts in the sealed file."""
    return index * (RECORD + TAG)


def record_length(size: int, index: int) -> int:
    """Plaintext bytes of record ``index`` of a blob of ``size`` bytes."""
    return max(0, min(RECORD, size - index * RECORD))


def blob_key(secret: bytes, sha: str) -> bytes:
    """The 32-byte AES key of blob ``sha`` under sealing secret ``secret``."""
    return hmac.new(secret, b"renderhive sealed blob key\x00" + bytes.fromhex(sha), hashlib.sha256).digest()


def digest():
    """A hasher of the BLAKE3 digest a sealed blob's TICKET carries (``update``, ``digest``: 32 bytes)."""
    return blake3.blake3()


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(sha: str, size: int, index: int) -> bytes:
    return _AAD + bytes.fromhex(sha) + size.to_bytes(8, "big") + index.to_bytes(8, "big")


class Sealer:
    """Seals and opens the records of one blob (``sha``, ``size``) under ``key``."""

    def __init__(self, key: bytes, sha: str, size: int):
        if len(key) != 32:
            raise ValueError("a sealed blob's key is 32 bytes")
        self.aead = AESGCM(key)
        self.sha = sha
        self.size = size

    def seal(self, index: int, plain, out: bytearray | memoryview) -> int:
        """Write record ``index`` of plaintext ``plain`` into ``out``; returns its length."""
        n = len(plain)
        if n != record_length(self.size, index):
            raise ValueError(f"record {index} of a {self.size}-byte blob holds {record_length(self.size, index)} "
                             f"bytes, not {n}")
        self.aead.encrypt_into(_nonce(index), plain, _aad(self.sha, self.size, index), memoryview(out)[:n + TAG])
        return n + TAG

    def open(self, index: int, record, out: bytearray | memoryview) -> int:
        """Write the plaintext of sealed record ``index`` into ``out``; returns its length. Raises
        SealError when the record does not open (its tag, its length)."""
        n = record_length(self.size, index)
        if len(record) != n + TAG:
            raise SealError(f"record {index} of blob {self.sha[:12]} is {len(record)} bytes, not {n + TAG}")
        try:
            self.aead.decrypt_into(_nonce(index), record, _aad(self.sha, self.size, index), memoryview(out)[:n])
        except InvalidTag:
            raise SealError(f"record {index} of blob {self.sha[:12]} failed its tag: changed on the way or on "
                            "the coordinator's disk") from None
        return n
