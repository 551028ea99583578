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
from farm.store.states import TASK_LEASED

Outgoing = list[tuple[bytes, Any]]
LEASED = tuple(s.value for s in TASK_LEASED)


class BlobRequests:
    """The worker plane's blob handlers. ``congested``: routing ids whose send queue is full (shared with
    the broker, which sets and clears them); ``stats``: the coordinator's counters."""

    def __init__(self, blobs: BlobStore, book: LeaseBook, congested: dict[bytes, float],
                 stats: defaultdict[str, int]):
        self.blobs = blobs
        self.book = book
        self.congested = congested
        self.stats = stats
        self.gets: dict[bytes, int] = {}  # BLOB_GETs handled per connection in this step
        self.manifests = ManifestFiles(blobs)  # a project lease may fetch the files of its manifest

    def new_step(self) -> None:
        self.gets.clear()

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
        length = max(0, min(msg.length, L.BLOB_CHUNK_SIZE))
        offset = max(0, msg.offset)
        data = self.blobs.read(msg.sha256, offset, length) if offset < total else b""
        self.stats["chunks_out"] += 1
        out.append((conn.identity, P.Blob(msg.sha256, offset, total, data)))

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
