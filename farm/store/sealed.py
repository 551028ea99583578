"""The coordinator's half of the sealed blob channel (format: :mod:`common.sealed`): sealed files and tickets.

* **Sealed files** live under ``blobs/sealed/``, one per blob, made when a creator stores a big blob
  (the store's ``stored_hook``: sealed before any worker asks, the fan-out waits for nothing) or on the
  first ticket of one (after a restart; a worker's own outputs) by one sealing thread (a blob is read, sealed and written once, whatever number of workers want it) and
  readable while they are being made: a download streams the records already written and waits for the
  rest (:meth:`Sealing.ready`). They are bounded by ``cap_bytes`` (least recently used go first; a file
  still open for a download stays readable until it is closed) and deleted at start: the sealing secret
  is this process's, so another process's files would not open under its keys anyway.
* **Tickets** are random names a worker presents to the sealed server (:mod:`farm.plane.sealed_http`)
  instead of its CurveZMQ identity: issued on the coordinator's thread to a connection holding a lease of
  the blob (``BlobRequests.on_ticket``), valid TICKET_SECONDS and for at most TICKET_STREAMS downloads at
  once, at most TICKETS_PER_CONNECTION a connection (the oldest goes), and void when their connection is
  dropped. A ticket only lets its holder download ciphertext; the key came over CurveZMQ.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common import sealed as S
from farm.store.blobs import BlobStore

log = logging.getLogger("farm.store.sealed")

CAP_BYTES = int(float(os.environ.get("RENDERHIVE_SEALED_CACHE_BYTES", 8 * 1024**3)))
"""Bytes of sealed files kept on the coordinator's disk (a blob sealing to more is never sealed: it goes
as BLOB chunks)."""

TICKET_SECONDS = 900.0
"""How long a ticket is valid (a 1 GiB scene at 10 MB/s takes ~110 s)."""

TICKET_STREAMS = 2
"""Downloads one ticket may have open at once (a resume may overlap the connection it replaces)."""

TICKETS_PER_CONNECTION = 32
"""Live tickets a worker connection may hold; a new one past that voids its oldest."""


@dataclass
class Ticket:
    sha: str
    size: int
    identity: bytes
    expires: float
    streams: int = 0


@dataclass
class Sealing:
    """One blob's sealed file, while it is being made and after. ``done``: bytes of the sealed file
    written so far (all of ``sealed_size`` once complete: what a reader may send); ``digest``: the
    plaintext's BLAKE3 (:func:`common.sealed.digest`), set once its sha256 matched, as the last record is
    written; ``error``: why sealing stopped."""
    sha: str
    size: int
    path: Path
    sealed_size: int
    done: int = 0
    digest: bytes = b""
    complete: bool = False
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    grew: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def wait(self, pos: int, timeout: float) -> None:
        """Until more than ``pos`` bytes are written, sealing stopped, or ``timeout`` seconds passed."""
        with self.grew:
            self.grew.wait_for(lambda: self.done > pos or self.complete or self.error, timeout)

    def _grown(self) -> None:
        with self.grew:
            self.grew.notify_all()

    def open(self):
        """A file object of the sealed file (the part being written, or the finished file)."""
        with self.lock:  # not while the sealer renames it
            return open(self.path, "rb")


class SealedChannel:
    """Sealed files and tickets of one coordinator. ``port``: where its sealed server listens (0 while none
    does: tickets are then refused and workers fetch BLOB chunks)."""

    def __init__(self, blobs: BlobStore, cap_bytes: int = CAP_BYTES, secret: bytes | None = None,
                 clock=time.monotonic):
        self.blobs = blobs
        self.cap_bytes = cap_bytes
        self.secret = secret or secrets.token_bytes(32)
        self.clock = clock
        self.port = 0
        self.dir = blobs.root / "sealed"
        shutil.rmtree(self.dir, ignore_errors=True)  # another process's secret: nothing there opens now
        self.dir.mkdir(parents=True)
        self._files: OrderedDict[str, Sealing] = OrderedDict()  # sha → its sealed file, least recent first
        self._bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sealer")
        self.tickets: dict[str, Ticket] = {}
        self._by_conn: dict[bytes, OrderedDict[str, None]] = {}
        self.stats = {"sealed_bytes": 0, "tickets": 0, "streams": 0, "bytes_sent": 0}
        blobs.stored_hook = self.prepare

    def prepare(self, sha: str, size: int) -> None:
        """A creator stored blob ``sha``: seal it now if it will go sealed (any thread)."""
        if self.fits(size):
            self.acquire(sha, size)
    # ------------------------------------------------------------------ tickets (coordinator thread)
    def key(self, sha: str) -> bytes:
        return S.blob_key(self.secret, sha)

    def issue(self, identity: bytes, sha: str, size: int) -> str:
        now = self.clock()
        mine = self._by_conn.setdefault(identity, OrderedDict())
        for name in list(mine):  # expired ones first, then the oldest while over the cap
            t = self.tickets.get(name)
            if t is None or t.expires <= now:
                self._void(identity, name)
        while len(mine) >= TICKETS_PER_CONNECTION:
            self._void(identity, next(iter(mine)))
        name = secrets.token_urlsafe(24)
        self.tickets[name] = Ticket(sha, size, identity, now + TICKET_SECONDS)
        mine[name] = None
        self.stats["tickets"] += 1
        return name

    def _void(self, identity: bytes, name: str) -> None:
        self.tickets.pop(name, None)
        mine = self._by_conn.get(identity)
        if mine is not None:
            mine.pop(name, None)

    def drop_connection(self, identity: bytes) -> None:
        """A worker connection is gone: its tickets are void (downloads under way finish)."""
        for name in self._by_conn.pop(identity, ()):
            self.tickets.pop(name, None)

    def ticket(self, name: str) -> Ticket | None:
        """The live ticket called ``name``, or None (unknown, expired or void)."""
        t = self.tickets.get(name)
        if t is None or t.expires <= self.clock():
            return None
        return t

    def digest(self, sha: str) -> bytes:
        """The BLAKE3 digest of blob ``sha`` once sealing checked its sha256 (from the moment its last
        record is written), else b"" (any thread)."""
        with self._lock:
            s = self._files.get(sha)
            return s.digest if s is not None and not s.error else b""

    def fits(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes goes over the sealed channel."""
        return self.port > 0 and S.MIN_BYTES <= size and S.sealed_size(size) <= self.cap_bytes

    # ------------------------------------------------------------------ sealed files (server's loop)
    def acquire(self, sha: str, size: int) -> Sealing:
        """Blob ``sha``'s sealed file, sealing it (in the sealing thread) if it is not there."""
        with self._lock:
            s = self._files.get(sha)
            if s is not None and not s.error:
                self._files.move_to_end(sha)
                return s
            if s is not None:
                self._forget(s)
            s = Sealing(sha, size, self.dir / f"{sha}.part", S.sealed_size(size))
            s.path.touch()  # readers open it at once; the sealer appends
            self._files[sha] = s
            self._bytes += s.sealed_size
            self._evict()
        self._pool.submit(self._seal, s)
        return s

    def _forget(self, s: Sealing) -> None:
        if self._files.get(s.sha) is s:
            del self._files[s.sha]
            self._bytes -= s.sealed_size
        with s.lock:
            s.path.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Least recently used sealed files go while over the cap (never one still being sealed, nor the
        newest); open readers keep reading the unlinked file."""
        for sha in list(self._files):
            if self._bytes <= self.cap_bytes or len(self._files) <= 1:
                break
            s = self._files[sha]
            if s.complete or s.error:
                self._forget(s)

    def _seal(self, s: Sealing) -> None:
        """Sealing thread: read the blob a record at a time, hash, seal, append; then rename into place.
        The last record is written only once the sha256 of all the bytes read matched the blob's name: a
        blob changed on this disk never completes a download (its readers stop at the record before)."""
        try:
            sealer = S.Sealer(self.key(s.sha), s.sha, s.size)
            out = bytearray(S.RECORD + S.TAG)
            view = memoryview(out)
            named, digest = hashlib.sha256(), S.digest()
            last = S.records(s.size) - 1
            with open(self.blobs.path(s.sha), "rb") as src, open(s.path, "r+b", buffering=0) as dst:
                for i in range(last + 1):
                    plain = src.read(S.record_length(s.size, i))
                    named.update(plain)
                    digest.update(plain)
                    if i == last:
                        if named.hexdigest() != s.sha:
                            raise ValueError("its bytes on the coordinator's disk no longer match its sha256 "
                                             "(the disk changed them): store the blob again")
                        s.digest = digest.digest()
                    n = sealer.seal(i, plain, out)
                    dst.write(view[:n])
                    s.done += n
                    s._grown()
            self.stats["sealed_bytes"] += s.sealed_size  # counted before the file shows under its name
            final = self.dir / s.sha
            with s.lock:
                os.replace(s.path, final)
                s.path = final
            s.complete = True
            s._grown()
        except Exception as exc:  # the blob went (or the disk is full): its downloads stop, workers fall back
            s.error = f"could not seal blob {s.sha[:12]}: {exc}"
            s._grown()
            log.warning("%s", s.error)
            with self._lock:
                self._forget(s)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
