"""In-process building blocks for fast coordinator tests: a real database, a real blob store, users, jobs,
and a driver that feeds encoded frames to ``Coordinator.step`` at a clock the test controls.

Nothing here is a fake: the database is a SQLite file in the test's tmp dir (or a PostgreSQL database,
from the ``db_url`` fixture), blobs are files, and frames are built by ``common.protocol.encode`` exactly as
a worker's DEALER would send them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlmodel import select

from common import protocol as P
from farm.core.coordinator import Coordinator
from farm.core.scheduler import Scheduler
from farm.store.blobs import BlobStore
from farm.store.db import make_engine
from farm.store.db import session as new_session
from farm.store.models import User
from farm.web import auth

SCENE_BYTES = b"BLENDER-v405" + bytes(range(256)) * 4  # a .blend header is all the coordinator checks


def make_engine_and_store(root: Path, max_bytes: int | None = None, url: str | None = None):
    """A blob store under ``root`` and a database: ``url`` (the ``db_url`` fixture's, for a test run on
    SQLite and on PostgreSQL), or a fresh SQLite file under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url or f"sqlite:///{root / 'farm.db'}")
    blobs = BlobStore(root / "blobs", max_bytes) if max_bytes is not None else BlobStore(root / "blobs")
    return engine, blobs


def make_user(engine, name: str, admin: bool = False) -> tuple[User, str]:
    with new_session(engine) as s:
        user, token = auth.create_user(s, name, is_admin=admin)
        s.commit()
        return user, token


def put_scene(blobs: BlobStore, tag: bytes = b"") -> str:
    return blobs.write_bytes(SCENE_BYTES + tag)


def make_job(engine, blobs: BlobStore, user: User, frames: str = "1", chunk: int = 1, priority: int = 0,
             scene: str | None = None, hold_for_deposit: bool = False, **extra: Any) -> int:
    """Create a Blender job through farm.kinds.registry (the API's own path) and return its id;
    ``hold_for_deposit``: as the API does when payments are on (the job starts ``funding``)."""
    from farm.kinds.registry import create_job
    req = {"scene_sha256": scene or put_scene(blobs), "frames": frames, "chunk": chunk, "priority": priority,
           **extra}
    with new_session(engine) as s:
        job = create_job("blender", s, user, blobs, req, hold_for_deposit)
        s.commit()
        return job.id


def rows(engine, model, *where, order=None) -> list:
    with new_session(engine) as s:
        q = select(model)
        for w in where:
            q = q.where(w)
        if order is not None:
            q = q.order_by(order)
        return list(s.exec(q))


def get(engine, model, key):
    with new_session(engine) as s:
        return s.get(model, key)


def output_blob(blobs: BlobStore, frame: int, tag: str = "", ext: str = "png") -> dict[str, Any]:
    """Store a fake frame file (as a worker's BLOB_PUT would have) and return its RESULT output entry."""
    data = f"\x89PNG frame {frame} {tag}".encode() * 10
    sha = blobs.write_bytes(data)
    return {"frame": frame, "sha256": sha, "size": len(data), "name": f"frame_{frame:04d}.{ext}", "seconds": 0.25}


class Driver:
    """Feeds messages to a coordinator at a controlled clock and keeps the replies.

    ``send((b"w1", msg), …)`` runs one ``step`` with those messages as one batch (raw frames may be given
    instead of a message) and returns the replies as (routing id, decoded message) pairs, each reply
    round-tripped through encode/decode as it would be on the wire."""

    def __init__(self, coord: Coordinator, now: float = 1000.0):
        self.coord = coord
        self.now = now

    def send(self, *items: tuple[bytes, Any], dt: float = 0.0) -> list[tuple[bytes, Any]]:
        self.now += dt
        batch = []
        for ident, msg in items:
            batch.append([ident, *(msg if isinstance(msg, list) else P.encode(msg))])
        out = self.coord.step(batch, now=self.now)
        return [(ident, P.decode(P.encode(msg))) for ident, msg in out]

    def tick(self, dt: float = 0.0) -> list[tuple[bytes, Any]]:
        return self.send(dt=dt)

    def hello(self, ident: bytes, slots: int = 1, running: list[list[int]] | None = None,
              worker_id: str | None = None, **caps: Any) -> list[tuple[bytes, Any]]:
        wid = worker_id or ident.decode()
        return self.send((ident, P.Hello(wid, "0xwallet", slots, {"runtimes": ["blender"], **caps},
                                         running or [])))


def new_coordinator(engine, blobs: BlobStore, seed: int = 0, verify: bool = False) -> Coordinator:
    """A coordinator for in-process tests; spot checks off unless asked for (the outputs these tests
    send are stand-in bytes, not pictures; tests/verify/test_verification.py sends real ones)."""
    return Coordinator(engine, blobs, Scheduler(seed=seed), verify=verify)


def of(out: list[tuple[bytes, Any]], cls: type, ident: bytes | None = None) -> list[Any]:
    """The replies of type ``cls`` (to ``ident`` when given)."""
    return [m for i, m in out if isinstance(m, cls) and (ident is None or i == ident)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
