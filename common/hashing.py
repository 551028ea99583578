"""Content addresses: what a blob's name must look like, and the sha256 of a file.

Blobs are named by the sha256 of their bytes on both sides of the worker plane (the coordinator's blob
store, the worker's cache), so a name is checked in one place before it becomes part of a path.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobError(ValueError):
    """A blob that cannot be stored: wrong hash, too large, malformed name."""


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):  # match(): "$" also matches before a "\n"
        raise BlobError(f"{str(sha)[:80]!r} is not a sha256 hex digest (64 lowercase hex characters)")
    return sha


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
