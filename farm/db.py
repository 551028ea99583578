"""Database engine and sessions. SQLite (WAL, synchronous=FULL: a commit survives kill -9 and power loss)
by default; any SQLAlchemy URL (``postgresql+psycopg://…``) through ``--db`` or ``DATABASE_URL``."""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from farm import models  # noqa: F401  (registers the tables)
from farm import ledger_models  # noqa: F401  (registers the payment tables)


def database_url(data_dir: Path, url: str | None = None) -> str:
    return url or os.environ.get("DATABASE_URL") or f"sqlite:///{Path(data_dir).resolve() / 'farm.db'}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # every pooled connection gets the same settings
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine)
    return engine


def session(engine: Engine) -> Session:
    # expire_on_commit=False: rows stay readable after the commit that persisted them (we send replies
    # built from them only after committing).
    return Session(engine, expire_on_commit=False)
