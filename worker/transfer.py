"""Blob transfer on the worker's side of the plane: downloads of task inputs (BLOB_GET → BLOB) and uploads
of outputs (BLOB_PUT → BLOB_ACK), over the daemon's one socket.

The daemon's connection loop hands every BLOB and BLOB_ACK to :meth:`Transfers.deliver`; a fetch or an
upload waits on its own queue. Invariants:

* credit: a download keeps at most ``credit`` requests of ``chunk_size`` open (WELCOME's values: the
  coordinator's, so a worker fetches from an older coordinator of 256 KiB chunks as from a newer one of
  1 MiB), an upload at most UPLOAD_CREDIT chunks of UPLOAD_CHUNK_SIZE unacknowledged;
* resumable: a download continues from the partial file in the cache folder (also after a restart), an
  upload from the bytes the coordinator says it stored (its probe's BLOB_ACK); after
  BLOB_TRANSFER_TIMEOUT without an answer (a reconnect lost requests) both ask again from what they have;
* one transfer of a blob at a time: a fetch or an upload of blob X waits for the one of X already under way
  (both wait on X's answers, which carry only X's hash). Two tasks of one worker may well make the same
  bytes (two probes of one scene): their uploads ran at once, the second took the first's answers, and
  the first then waited for answers forever, holding its task;
* sealed: a big input (common.sealed.MIN_BYTES and more) comes by HTTP from the coordinator's sealed server
  (one ciphertext for every worker, sent by sendfile; worker.sealed_fetch) when the coordinator gives a
  ticket: TICKET_GET leaves with the first BLOB_GET, so small blobs wait for nothing more. What the sealed
  download does not bring (a server out of reach, a cut, a record that does not open) is fetched as BLOB
  chunks from where it stopped; a connection whose coordinator never answers TICKET_GET (an older one)
  fetches BLOB chunks only;
* verified: a download enters the cache only when the sha256 of the bytes written matches its name, or,
  for one that took the sealed channel, when their BLAKE3 matches the digest its TICKET carried (the
  coordinator's, taken as it sealed the blob after checking its sha256; common.sealed says why that is
  as strong a check and cheaper). The hash is taken while writing (a resumed download first hashes the
  partial file's bytes from disk), so the finished file is not read back.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import limits as L
from common import protocol as P
from common import sealed as S
from common.hashing import file_sha256
from worker import sealed_fetch
from worker import settings as C
from worker.blobcache import BlobCache
from worker.tasks.executors import TaskFailure

MAX_WINDOW_BYTES = 64 * 1024 * 1024
"""Most bytes of requests a download keeps open, whatever a coordinator's WELCOME says."""

TICKET_WAIT = 5.0
"""Seconds a big download waits for TICKET before it takes BLOB chunks (and stops asking this connection)."""

SEALED_TRIES = 3
"""Sealed downloads of one blob that may end without progress before the rest comes as BLOB chunks."""

log = logging.getLogger("worker.transfer")


def _hash_prefix(path: Path, size: int, h: Any = None) -> Any:
    """Hasher ``h`` (a new sha256 by default) fed the first ``size`` bytes of ``path`` (what a download
    already has)."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        left = size
        while left > 0:
            data = f.read(min(left, 1 << 20))
            if not data:
                break
            h.update(data)
            left -= len(data)
    return h


class _Check:
    """What a download's file is checked against before it enters the cache: the sha256 of its name, fed
    as bytes are written; or, once it goes sealed, the coordinator's BLAKE3 digest of the blob
    (:mod:`common.sealed`; ~0.2 s of CPU a GiB instead of 0.6-2 s; the bytes already written are hashed
    again from the file, the rest as they are written). ``digest`` comes with the TICKET, or, for a blob
    that was still being sealed then, from a second TICKET_GET at the end; without one the file's sha256 is
    taken from disk."""

    def __init__(self, sha: str, h: Any):
        self.sha, self.h, self.digest, self.blake = sha, h, b"", False

    def update(self, data) -> None:
        self.h.update(data)

    def use_blake3(self, digest: bytes, part: Path, size: int) -> None:
        """Hash with BLAKE3 from now on (``digest``: b"" while unknown); ``part`` holds ``size`` bytes
        already (a thread)."""
        self.h, self.digest, self.blake = _hash_prefix(part, size, S.digest()), digest, True

    def ok(self, part: Path) -> bool:
        """Whether the finished file ``part`` passes (a thread: it may read the file)."""
        if not self.blake:
            return self.h.hexdigest() == self.sha
        if self.digest:
            return self.h.digest() == self.digest
        return file_sha256(part) == self.sha


class Transfers:
    """The daemon's blob transfers. ``send``: the daemon's send (drops while disconnected; the timeouts
    recover); ``stats``: the daemon's counters (``bytes_downloaded``, ``bytes_uploaded``, ``bytes_sealed``);
    ``host``: the coordinator's host (its sealed server's; None: BLOB chunks only)."""

    def __init__(self, cache: BlobCache, send: Callable[[Any], None], stats: dict[str, int],
                 host: str | None = None):
        self.cache = cache
        self.host = host
        self.sealed_ok = host is not None  # cleared for a connection whose coordinator ignores TICKET_GET
        self.tickets: dict[str, asyncio.Future] = {}  # blob → the TICKET its download waits for
        stats.setdefault("bytes_sealed", 0)
        self.send = send
        self.stats = stats
        self.inbox: dict[str, asyncio.Queue] = {}  # blob transfers waiting for BLOB / BLOB_ACK
        self.busy: dict[str, list] = {}  # blob → [lock, users]: one transfer of a blob at a time
        self.chunk_size = L.BLOB_CHUNK_SIZE
        self.credit = L.BLOB_CREDIT

    def welcome(self, chunk_size: int, credit: int) -> None:
        """Fetch with the chunk and credit the coordinator serves (WELCOME), within what this worker's
        decoder takes (MAX_BLOB_MESSAGE_BYTES) and MAX_WINDOW_BYTES."""
        self.chunk_size = max(4096, min(int(chunk_size), L.BLOB_CHUNK_SIZE))
        self.credit = max(1, min(int(credit), MAX_WINDOW_BYTES // self.chunk_size))
        self.sealed_ok = self.host is not None  # a new connection: perhaps a newer coordinator

    def no_tickets(self) -> None:
        """The coordinator does not know TICKET_GET (an older one): BLOB chunks only on this connection."""
        self.sealed_ok = False
        for sha, fut in self.tickets.items():
            if not fut.done():
                fut.set_result(P.Ticket(sha, "", b"", 0, 0, error="the coordinator has no sealed channel"))

    def deliver_ticket(self, msg: P.Ticket) -> None:
        fut = self.tickets.get(msg.sha256)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def deliver(self, msg: P.Blob | P.BlobAck) -> None:
        q = self.inbox.get(msg.sha256)
        if q is not None:
            q.put_nowait(msg)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, sha: str):
        """Held while blob ``sha`` is fetched or uploaded; its entry goes when no one holds or waits for it."""
        entry = self.busy.setdefault(sha, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self.busy[sha]

    async def fetch(self, sha: str) -> Path:
        """The cached path of blob ``sha``, downloading what is missing (resumes a partial download)."""
        async with self._one_at_a_time(sha):
            if self.cache.has(sha):
                return self.cache.path(sha)
            while (f := self.cache.claim(sha)) is None:  # a worker sharing this cache folder fetches it
                await asyncio.sleep(0.05)
            if self.cache.has(sha):  # it did meanwhile
                self.cache.release(f, sha)
                return self.cache.path(sha)
            part = self.cache.partial(sha)
            q = self.inbox[sha] = asyncio.Queue()
            try:
                with f:  # the claim (an flock) is held until the blob is in place or the fetch stops
                    offset = os.fstat(f.fileno()).st_size
                    h = await asyncio.to_thread(_hash_prefix, part, offset) if offset else hashlib.sha256()
                    check = _Check(sha, h)
                    await self._download(sha, f, offset, q, check)
                    f.flush()
                    if check.blake and not check.digest:
                        check.digest = await self._late_digest(sha)
                    if not await asyncio.to_thread(check.ok, part):
                        part.unlink(missing_ok=True)
                        what = "the digest its sealed channel gave" if check.digest else "its sha256"
                        raise TaskFailure(f"downloaded blob {sha} failed its hash check ({what}); it will be "
                                          "fetched again", True)
                    return self.cache.commit(part, sha)
            finally:
                self.inbox.pop(sha, None)

    async def _download(self, sha: str, f, offset: int, q: asyncio.Queue, h) -> None:
        """Write blob ``sha`` from ``offset`` to its end into ``f``, feeding ``h``: requests in flight up to
        the credit, chunks taken in order (an out-of-order or repeated one is ignored)."""
        chunk, credit = self.chunk_size, self.credit  # one fetch keeps its window (a WELCOME may change it)
        ticket = self._ask_ticket(sha)  # asked with the first chunk: answered as soon
        try:
            await self._chunks(sha, f, offset, q, h, chunk, credit, ticket)
        finally:
            if ticket is not None:
                self.tickets.pop(sha, None)

    async def _chunks(self, sha: str, f, offset: int, q: asyncio.Queue, h, chunk: int, credit: int,
                      ticket: asyncio.Future | None) -> None:
        total: int | None = None
        next_req = offset
        while total is None or offset < total:
            if ticket is not None and total is not None:  # the size is known: sealed if it is worth it
                if total - offset >= S.MIN_BYTES and next_req == offset:
                    offset = next_req = await self._sealed(sha, ticket, f, h, offset, total)
                    if offset >= total:
                        break
                ticket = None
            window = credit if total is not None else 1
            while next_req - offset < window * chunk and (total is None or next_req < total):
                self.send(P.BlobGet(sha, next_req, chunk))
                next_req += chunk
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a task's CANCEL
                async with asyncio.timeout(C.BLOB_TRANSFER_TIMEOUT):
                    m = await q.get()
            except TimeoutError:
                next_req = offset  # lost requests (reconnect): ask again from what we have
                continue
            if m.error:
                raise TaskFailure(f"the coordinator has no blob {sha}: {m.error}", True)
            total = m.total
            if m.offset == offset and m.data:
                f.write(m.data)
                h.update(m.data)
                offset += len(m.data)
                self.stats["bytes_downloaded"] += len(m.data)
                if len(m.data) != chunk and offset < total:  # a coordinator serving smaller chunks than
                    next_req = offset                       # asked: ask again from where it stopped
            elif m.offset == offset and offset >= total:
                break

    async def _sealed(self, sha: str, ticket: asyncio.Future, f, h, offset: int, total: int) -> int:
        """Fetch blob ``sha`` from ``offset`` over the sealed channel, if the coordinator gives a ticket;
        returns how far the file got (the rest comes as BLOB chunks)."""
        try:
            async with asyncio.timeout(TICKET_WAIT):
                t = await ticket
        except TimeoutError:
            self.sealed_ok = False
            log.warning("no TICKET from the coordinator in %.0f s (an older one?): fetching BLOB chunks only "
                        "on this connection", TICKET_WAIT)
            return offset
        if t.error or t.total != total or len(t.key) != 32 or not 0 < t.port < 65536:
            return offset
        f.flush()  # checked against the coordinator's BLAKE3 of the blob from here on
        await asyncio.to_thread(h.use_blake3, t.digest if len(t.digest) == 32 else b"", self.cache.partial(sha),
                                offset)
        fruitless = 0
        while offset < total and fruitless < SEALED_TRIES:
            stop = sealed_fetch.Stop()
            run = asyncio.ensure_future(asyncio.to_thread(
                sealed_fetch.download, self.host, t.port, t.ticket, t.key, sha, total, f, h, offset, stop))
            try:
                out = await asyncio.shield(run)
            except asyncio.CancelledError:  # the task went: the thread stops before the file is closed
                stop.set()
                with contextlib.suppress(Exception):
                    await run
                raise
            self.stats["bytes_downloaded"] += out.offset - offset
            self.stats["bytes_sealed"] += out.received
            fruitless = 0 if out.offset > offset else fruitless + 1
            offset = out.offset
            if out.error and offset < total:
                log.warning("sealed download of %s stopped at %d of %d bytes: %s", sha[:12], offset, total,
                            out.error)
                if out.final:
                    break  # not a cut connection: the rest as BLOB chunks
        return offset

    def _ask_ticket(self, sha: str) -> asyncio.Future | None:
        """Send TICKET_GET for blob ``sha``: the future its TICKET sets (the caller pops it from
        ``tickets``), or None when this connection does not ask (no sealed channel, or asked already)."""
        if not self.sealed_ok or sha in self.tickets:
            return None
        fut = self.tickets[sha] = asyncio.get_running_loop().create_future()
        self.send(P.TicketGet(sha))
        return fut

    async def _late_digest(self, sha: str) -> bytes:
        """The coordinator's BLAKE3 digest of blob ``sha`` from a second TICKET_GET (the blob was being
        sealed at the first: it is known once its last record is written), or b"" (then the sha256)."""
        if (fut := self._ask_ticket(sha)) is None:
            return b""
        try:
            async with asyncio.timeout(TICKET_WAIT):
                t = await fut
        except TimeoutError:
            return b""
        finally:
            self.tickets.pop(sha, None)
        return t.digest if not t.error and len(t.digest) == 32 else b""

    async def upload(self, path: Path, sha: str) -> None:
        """Send ``path`` as blob ``sha``: probe where the coordinator stands, then stream with credit. After
        another upload of the same bytes, the probe's answer is that they are stored: one round trip."""
        async with self._one_at_a_time(sha):
            await self._upload(path, sha)

    async def _upload(self, path: Path, sha: str) -> None:
        total = path.stat().st_size
        chunk = L.UPLOAD_CHUNK_SIZE
        q = self.inbox[sha] = asyncio.Queue()
        try:
            with open(path, "rb") as f:
                acked = None
                self.send(P.BlobPut(sha, 0, total, b""))  # probe: answered with the bytes already stored
                next_send = 0
                while True:
                    if acked is not None:
                        while next_send < total and next_send - acked < L.UPLOAD_CREDIT * chunk:
                            f.seek(next_send)
                            data = f.read(chunk)
                            self.send(P.BlobPut(sha, next_send, total, data))
                            self.stats["bytes_uploaded"] += len(data)
                            next_send += len(data)
                    try:
                        async with asyncio.timeout(C.BLOB_TRANSFER_TIMEOUT):
                            ack = await q.get()
                    except TimeoutError:
                        acked = None
                        self.send(P.BlobPut(sha, 0, total, b""))
                        continue
                    if ack.error:
                        raise TaskFailure(f"upload of {path.name} refused: {ack.error}", True)
                    if ack.done:
                        return
                    if acked is None or ack.offset > acked:
                        if acked is None:
                            next_send = ack.offset
                        acked = ack.offset
        finally:
            self.inbox.pop(sha, None)
