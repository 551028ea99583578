"""Blobs over the worker plane: BLOB_GET (chunks of a task's inputs) and BLOB_PUT (chunks of its outputs).

Handlers of the coordinator's step, on its thread, in its transaction. Invariants:

* blobs go to workers by need only: a chunk is served only to a connection holding a lease whose inputs
  name the blob, or name the project manifest that names it (another job's frames, or this job's before
  approval, are no one else's to download);
  a grant stays for the connection's life once seen, so a worker may fetch it again, resuming;
* every request kind has credit: at most ``BLOB_GETS_PER_STEP`` GETs a connection are served a step,
  none while its send queue is full (``congested``, kept by the broker), so a flood is never read from
  disk; at most ``UPLOADS_PER_CONNECTION`` unfinished uploads (each a partial file) a connection;
* uploads need a lease, and a finished upload is recorded as a blob row of origin ``worker``.

:meth:`BlobRequests.serve_cached` answers, on the broker's loop before the step, the BLOB_GETs it can
answer without the database or the disk: of a blob already granted to the connection, a chunk in the
store's read cache (fan-out: the first of 8 workers' GETs of a chunk reads it in the step, the other 7
are served so). The same bounds hold (congested, BLOB_GETS_PER_STEP, counted with the step's own); a
connection's GETs after one left for the step go to the step too, so its chunks leave in the order asked.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlmodel import Session, select

from common import limits as L
from common import protocol as P
from farm import constants as C
from farm.core.leases import LeaseBook
from farm.core.scheduler import Conn
from farm.kinds.projects import ManifestFiles
from farm.store.blobs import BlobError, BlobStore
from farm.store.models import Blob as BlobRow
from farm.store.models import Task
from farm.store.sealed import SealedChannel
from farm.store.states import TASK_LEASED

Outgoing = list[tuple[bytes, Any]]
LEASED = tuple(s.value for s in TASK_LEASED)
_GET_COMMAND = bytes([P.BlobGet.command])


class BlobRequests:
    """The worker plane's blob handlers. ``congested``: routing ids whose send queue is full (shared with
    the broker, which sets and clears them); ``stats``: the coordinator's counters."""

    def __init__(self, blobs: BlobStore, book: LeaseBook, congested: dict[bytes, float],
                 stats: defaultdict[str, int], sealed: SealedChannel | None = None):
        self.blobs = blobs
        self.sealed = sealed
        self.book = book
        self.congested = congested
        self.stats = stats
        self.gets: dict[bytes, int] = {}  # BLOB_GETs handled per connection in this step
        self.manifests = ManifestFiles(blobs)  # a project lease may fetch the files of its manifest
        self._early: dict[bytes, int] = {}  # those serve_cached handled for the step that comes next
        self.sizes: dict[str, int] = {}  # blob → its size, for serve_cached (a blob never changes under its name)

    def new_step(self) -> None:
        """A step begins: its GETs count on from those serve_cached answered just before it."""
        self.gets, self._early = self._early, {}

    def serve_cached(self, conns: dict[bytes, Conn], batch: list[list[bytes]], now: float,
                     out: Outgoing) -> list[list[bytes]]:
        """Answer the BLOB_GETs of ``batch`` (ROUTER frames) that need neither the database nor the disk into
        ``out``; returns the messages left for the step, in their order. Broker loop, between steps."""
        rest: list[list[bytes]] = []
        early = self._early = {}  # a budget of BLOB_GETS_PER_STEP a connection for this batch and its step
        cache, sizes, congested = self.blobs.read_cache, self.sizes, self.congested
        stepped: set[bytes] = set()  # connections with a GET left for the step: the rest of theirs follow it
        for frames in batch:
            ident = frames[0]
            if len(frames) != 4 or frames[2] != _GET_COMMAND or ident in stepped:
                rest.append(frames)
                continue
            conn = conns.get(ident)
            try:
                msg = P.decode(frames[1:])
            except P.ProtocolError:
                msg = None
            total = sizes.get(msg.sha256) if msg is not None else None
            data = None
            if conn is not None and total is not None and msg.sha256 in conn.granted:
                offset, length = max(0, msg.offset), max(0, min(msg.length, L.BLOB_CHUNK_SIZE))
                data = cache.peek((msg.sha256, offset, length)) if offset < total else b""
            if data is None:
                stepped.add(ident)
                rest.append(frames)
                continue
            conn.last_seen = now
            n = early[ident] = early.get(ident, 0) + 1
            if n > C.BLOB_GETS_PER_STEP or ident in congested:
                self.stats["blob_gets_dropped"] += 1
                continue
            self.stats["chunks_out"] += 1
            self.stats["chunks_cached"] += 1
            out.append((ident, P.Blob(msg.sha256, offset, total, data)))
        return rest

    def on_get(self, s: Session, conn: Conn, msg: P.BlobGet, now: float, out: Outgoing) -> None:
        # credit: a worker has at most BLOB_CREDIT requests in flight per blob (a few blobs at once); past
        # that in one step, or while its send queue is full, requests are not served (nothing is read for them)
        n = self.gets[conn.identity] = self.gets.get(conn.identity, 0) + 1
        if n > C.BLOB_GETS_PER_STEP or conn.identity in self.congested:
            self.stats["blob_gets_dropped"] += 1
            return
        if not self.may_fetch(s, conn, msg.sha256):
            self.stats["blob_refused"] += 1
            out.append((conn.identity, P.Blob(msg.sha256, msg.offset, 0, b"", error=(
                "not an input of a task you hold: a worker fetches only the inputs of its own leases"))))
            return
        try:
            total = self.blobs.size(msg.sha256)
        except (BlobError, OSError):
            out.append((conn.identity, P.Blob(msg.sha256, msg.offset, 0, b"", error="unknown blob")))
            return
        if msg.sha256 not in self.sizes:
            if len(self.sizes) >= 4096:
                self.sizes.clear()
            self.sizes[msg.sha256] = total
        length = max(0, min(msg.length, L.BLOB_CHUNK_SIZE))
        offset = max(0, msg.offset)
        data = self.blobs.read(msg.sha256, offset, length) if offset < total else b""
        self.stats["chunks_out"] += 1
        out.append((conn.identity, P.Blob(msg.sha256, offset, total, data)))

    def on_ticket(self, s: Session, conn: Conn, msg: P.TicketGet, now: float, out: Outgoing) -> None:
        """TICKET_GET: a ticket of the sealed channel for a big input of a lease of ``conn`` (counted with its
        BLOB_GETs: a flood of them is dropped unread like theirs)."""
        n = self.gets[conn.identity] = self.gets.get(conn.identity, 0) + 1
        if n > C.BLOB_GETS_PER_STEP or conn.identity in self.congested:
            self.stats["blob_gets_dropped"] += 1
            return
        def refuse(why: str) -> None:
            out.append((conn.identity, P.Ticket(msg.sha256, "", b"", 0, 0, error=why)))
        if not self.may_fetch(s, conn, msg.sha256):
            self.stats["blob_refused"] += 1
            refuse("not an input of a task you hold: a worker fetches only the inputs of its own leases")
            return
        try:
            total = self.blobs.size(msg.sha256)
        except (BlobError, OSError):
            refuse("unknown blob")
            return
        if self.sealed is None or not self.sealed.fits(total):
            refuse("fetch it with BLOB_GET (no sealed server here, or the blob is small)")
            return
        name = self.sealed.issue(conn.identity, msg.sha256, total)
        out.append((conn.identity, P.Ticket(msg.sha256, name, self.sealed.key(msg.sha256), total, self.sealed.port,
                                            digest=self.sealed.digest(msg.sha256))))

    def on_put(self, s: Session, conn: Conn, msg: P.BlobPut, now: float, out: Outgoing) -> None:
        if not self._holds_a_lease(s, conn):
            out.append((conn.identity, P.BlobAck(msg.sha256, 0, False, "uploads need a task lease")))
            return
        if msg.sha256 not in conn.uploading and len(conn.uploading) >= C.UPLOADS_PER_CONNECTION:
            # each begun upload is a partial file on disk: one connection may not start them without end
            out.append((conn.identity, P.BlobAck(msg.sha256, 0, False, (
                f"{len(conn.uploading)} uploads of this connection are unfinished, the most one may have: "
                "finish them (or reconnect) before starting another"))))
            return
        try:
            stored, done, taken = self.blobs.put_chunk(msg.sha256, msg.offset, msg.total, msg.data)
        except BlobError as exc:
            out.append((conn.identity, P.BlobAck(msg.sha256, 0, False, str(exc))))
            return
        if done:
            conn.uploading.discard(msg.sha256)
        elif taken and msg.data:
            conn.uploading.add(msg.sha256)
        if done and not s.get(BlobRow, msg.sha256):
            s.add(BlobRow(sha256=msg.sha256, size=stored, origin="worker"))
        # Acks go to taken chunks and to probes (empty chunks, asking where to resume); an out-of-order
        # chunk gets none: the sender times out and resumes from its last acked offset.
        if taken or done or not msg.data:
            out.append((conn.identity, P.BlobAck(msg.sha256, stored, done)))

    def may_fetch(self, s: Session, conn: Conn, sha: str) -> bool:
        """Whether ``conn`` holds a lease whose inputs name blob ``sha`` — itself, or as a file of the
        project manifest among them — (or did, on this connection)."""
        if sha in conn.granted:
            return True
        def names(rows) -> bool:
            return any(sha in row.inputs or self.manifests.names(row.spec, sha) for row in rows)
        if names(row for row in self.book.rows.values() if row.worker_id == conn.worker_id) or names(
                s.exec(select(Task.inputs, Task.spec).where(Task.worker_id == conn.worker_id)  # live leases, in memory first
                       .where(Task.status.in_(LEASED)).limit(256)).all()):
            conn.granted.add(sha)
            return True
        return False

    @staticmethod
    def _holds_a_lease(s: Session, conn: Conn) -> bool:
        return s.exec(select(Task.id).where(Task.worker_id == conn.worker_id)
                      .where(Task.status.in_(LEASED)).limit(1)).first() is not None
