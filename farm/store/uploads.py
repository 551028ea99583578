"""Resumable uploads from creators: a partial blob per (user, sha256), extended by offset, verified by hash.

A creator's big file (a 2 GiB texture cache over a Wi-Fi link) must survive a dropped connection without
being sent again from the first byte. The HTTP routes (:mod:`farm.web.api_uploads`) ask this area where an
upload stands and append what arrives; the area keeps, per user, files ``ROOT/uploads/<user id>/<sha256>``
in the blob store's disk, next to the blobs, so that a finished upload is renamed into place (atomic).

Invariants (an open network: every bound is tested as an attack in tests/web/test_resumable_uploads.py):

* a partial's total size is declared when it begins and never changes; it is at most the store's
  ``max_bytes``; bytes are only appended **at the current end** (:class:`OffsetMismatch` says where that is,
  so the client resumes from there) and never beyond the declared size;
* a user holds at most ``max_per_user`` partials whose declared sizes add up to at most ``max_user_bytes``
  (:class:`TooManyUploads`); a partial not extended for ``idle_seconds`` (by the injectable ``clock``) is
  dropped by the next sweep, which runs before any partial begins and whenever a user asks about theirs;
* when the last byte arrives the whole file is hashed: equal to its name, it becomes a blob (and a partial
  never is one before); otherwise it is deleted and :class:`HashMismatch` says so;
* one request at a time extends a given partial (:meth:`claim`): a second one is refused, not interleaved.

The sizes live in the file names (``<sha256>.<declared size>``): no database row, nothing to reconcile
after a crash; a coordinator that stops mid-write keeps what reached the disk, which the client resumes.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.hashing import BlobError, check_sha
from farm.store.blobs import BlobStore

PARTIALS_PER_USER = int(os.environ.get("RENDERHIVE_UPLOAD_PARTIALS_PER_USER", 8))
"""Unfinished resumable uploads one user may hold (a client uploads one file at a time; 8 leaves room for
a few abandoned ones until they expire)."""

PARTIAL_BYTES_PER_USER = int(os.environ.get("RENDERHIVE_UPLOAD_PARTIAL_BYTES_PER_USER", 16 * 1024**3))
"""Declared bytes of one user's unfinished uploads together (reserved when each begins, not when its bytes
arrive, so a user cannot start many small-looking uploads and grow them all): 16 GiB, four of the largest
blobs."""

PARTIAL_IDLE_HOURS = float(os.environ.get("RENDERHIVE_UPLOAD_IDLE_HOURS", 24.0))
"""Hours after which an unfinished upload that got no byte is dropped (the client starts it over)."""


RECEIVED_KEPT = 10_000
"""Uploads whose received byte counts :attr:`UploadArea.received` keeps (about 150 bytes each)."""


class UploadError(BlobError):
    status = 422


class OffsetMismatch(UploadError):
    """Bytes sent at another offset than the partial's end; ``offset`` is where it stands."""
    status = 409

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class TooManyUploads(UploadError):
    status = 429


class HashMismatch(UploadError):
    status = 422


class Busy(UploadError):
    status = 409


@dataclass(frozen=True)
class Standing:
    """Where one upload stands: ``offset`` bytes received of ``size`` (None: not begun), or complete."""
    sha256: str
    offset: int
    size: int | None
    complete: bool

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "offset": self.offset, "size": self.size, "complete": self.complete}


class UploadArea:
    def __init__(self, blobs: BlobStore, max_per_user: int = PARTIALS_PER_USER,
                 max_user_bytes: int = PARTIAL_BYTES_PER_USER, idle_seconds: float = PARTIAL_IDLE_HOURS * 3600,
                 clock: Callable[[], float] = time.time):
        self.blobs, self.max_per_user, self.max_user_bytes = blobs, max_per_user, max_user_bytes
        self.idle_seconds, self.clock = idle_seconds, clock
        self.root = blobs.root / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self._busy: set[tuple[int, str]] = set()
        self.received: dict[tuple[int, str], int] = {}
        """Bytes appended per (user, sha256) since this area was made (what the network really carried; tests
        and the bench read it). Bounded: the oldest of more than RECEIVED_KEPT entries is forgotten."""

    # ------------------------------------------------------------------ files
    def _dir(self, user: int) -> Path:
        return self.root / str(int(user))

    def _partials(self, user: int) -> dict[str, tuple[Path, int]]:
        """sha256 → (file, declared size) of the user's partials."""
        out = {}
        try:
            names = os.listdir(self._dir(user))
        except FileNotFoundError:
            return out
        for name in names:
            sha, _, size = name.partition(".")
            if size.isdigit():
                out[sha] = (self._dir(user) / name, int(size))
        return out

    def _drop(self, user: int, sha: str, path: Path) -> None:
        path.unlink(missing_ok=True)

    def sweep(self, user: int | None = None) -> int:
        """Drop partials idle for ``idle_seconds`` (one user's, or everyone's). Returns how many."""
        now, dropped = self.clock(), 0
        users = [user] if user is not None else [int(d) for d in os.listdir(self.root) if d.isdigit()]
        for u in users:
            for sha, (path, _size) in self._partials(u).items():
                if (u, sha) in self._busy:
                    continue
                try:
                    idle = now - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if idle > self.idle_seconds:
                    self._drop(u, sha, path)
                    dropped += 1
        return dropped

    # ------------------------------------------------------------------ the protocol
    def standing(self, user: int, sha: str) -> Standing:
        check_sha(sha)
        size = self.blobs.file_size(sha)
        if size is not None:
            return Standing(sha, size, size, True)
        self.sweep(user)
        found = self._partials(user).get(sha)
        if found is None:
            return Standing(sha, 0, None, False)
        return Standing(sha, found[0].stat().st_size, found[1], False)

    def discard(self, user: int, sha: str) -> bool:
        """Abandon the user's partial of ``sha`` (True if there was one)."""
        check_sha(sha)
        found = self._partials(user).get(sha)
        if found is None or (user, sha) in self._busy:
            return False
        self._drop(user, sha, found[0])
        return True

    def claim(self, user: int, sha: str) -> None:
        """Take the right to extend this partial for one request (:meth:`release` gives it back)."""
        if (user, sha) in self._busy:
            raise Busy(f"another request is uploading {sha} for you right now: wait for it to end (or close "
                       "it), then ask GET /api/blobs/{sha}/upload where the upload stands and resume from there")
        self._busy.add((user, sha))

    def release(self, user: int, sha: str) -> None:
        self._busy.discard((user, sha))

    def open(self, user: int, sha: str, offset: int, size: int) -> Path:
        """The partial file to append to at ``offset`` (begun when ``offset`` is 0 and there is none).
        Raises OffsetMismatch, TooManyUploads or UploadError; the caller holds :meth:`claim`."""
        check_sha(sha)
        if not 0 <= size <= self.blobs.max_bytes:
            raise UploadError(f"declared size {size} is not between 0 and the {self.blobs.max_bytes} byte limit: "
                              "reduce the file (pack fewer or smaller textures)")
        partials = self._partials(user)
        found = partials.get(sha)
        if found is not None:
            path, declared = found
            if declared != size:
                raise UploadError(f"this upload of {sha} was begun with a size of {declared} bytes, not {size}: "
                                  "a file's size follows from its hash; DELETE /api/blobs/{sha}/upload to start over")
            have = path.stat().st_size
            if offset != have:
                raise OffsetMismatch(f"offset {offset} is not where this upload stands: the farm has {have} of "
                                     f"its {size} bytes; send the rest from offset {have}", have)
            return path
        if offset != 0:
            raise OffsetMismatch(f"offset {offset} is not where this upload stands: the farm has none of it; send "
                                 "it from offset 0", 0)
        self.sweep()
        partials = self._partials(user)
        if len(partials) >= self.max_per_user:
            raise TooManyUploads(f"you have {len(partials)} unfinished uploads, the most a user may hold: finish "
                                 "or abandon one (DELETE /api/blobs/SHA/upload), or wait "
                                 f"{self.idle_seconds / 3600:g} h after its last byte for it to expire")
        reserved = sum(s for _p, s in partials.values())
        if reserved + size > self.max_user_bytes:
            raise TooManyUploads(f"your unfinished uploads hold {reserved} bytes; {size} more would pass the "
                                 f"{self.max_user_bytes} byte limit a user may hold unfinished: finish or abandon "
                                 "one first (DELETE /api/blobs/SHA/upload)")
        self._dir(user).mkdir(exist_ok=True)
        path = self._dir(user) / f"{sha}.{size}"
        path.touch()
        self.touch(path)
        return path

    def touch(self, path: Path) -> None:
        """Mark the partial as extended now (by this area's clock, so the idle limit can be tested)."""
        now = self.clock()
        os.utime(path, (now, now))

    def count(self, user: int, sha: str, n: int) -> None:
        key = (user, sha)
        self.received[key] = self.received.pop(key, 0) + n
        if len(self.received) > RECEIVED_KEPT:
            del self.received[next(iter(self.received))]

    def finish(self, user: int, sha: str, path: Path) -> int:
        """Hash the complete partial: store it as blob ``sha`` (returns its size), or delete it and raise
        HashMismatch. Runs off the event loop (it reads the whole file)."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sha:
            self._drop(user, sha, path)
            raise HashMismatch(f"the uploaded bytes hash to {h.hexdigest()}, not {sha}: the upload was discarded; "
                               "check that the file did not change while it was sent, and upload it again")
        size = path.stat().st_size
        self.blobs.adopt(path, sha)
        return size
