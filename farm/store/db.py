"""Database engine and sessions. SQLite (WAL, synchronous=FULL: a commit survives kill -9 and power loss)
by default; PostgreSQL (``postgresql://…``, driven by psycopg 3) or any SQLAlchemy URL through ``--db`` or
``DATABASE_URL``. Opening a database brings its schema to the newest migration (:mod:`farm.store.migrate`).

PostgreSQL runs at READ COMMITTED, its default, stated here so that a server configured otherwise does
not change the farm's behaviour: job and task rows are written by the coordinator's thread only (the API
hands its changes to it through ``broker.call``), so no read-modify-write races another writer."""
from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, create_engine

from farm.store import (
    ledger_models,  # noqa: F401  (registers the payment tables)
    migrate,
    models,  # noqa: F401  (registers the tables)
)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or opened; the message says what to check."""


def database_url(data_dir: Path, url: str | None = None) -> str:
    return url or os.environ.get("DATABASE_URL") or f"sqlite:///{Path(data_dir).resolve() / 'farm.db'}"


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (no driver named) use psycopg 3, the driver we install."""
    u = make_url(url)
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str, upgrade: bool = True) -> Engine:
    """An engine for ``url``; with ``upgrade``, the database is first brought to the newest revision."""
    url = normalize_url(url)
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
    elif url.startswith("postgresql"):
        engine = create_engine(url, isolation_level="READ COMMITTED", connect_args={"connect_timeout": 10})
        _ping_when_idle(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if upgrade:
        try:
            migrate.upgrade(engine)
        except OperationalError as exc:
            raise DatabaseUnavailable(f"cannot open the database {engine.url.render_as_string(hide_password=True)}: "
                                      f"{str(exc.orig).strip()} (check --db or DATABASE_URL, and that the database "
                                      "server runs and the database exists)") from exc
    return engine


PING_IDLE_SECONDS = 2.0
"""A pooled PostgreSQL connection back in the pool for longer than this is pinged before it is handed out."""


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, for connections that sat idle only: a connection the server closed (restart, idle
    timeout) is replaced, not handed out. A ping is a round trip, and the coordinator's step takes its
    connection back from the pool every few milliseconds: pinging each checkout was one of ~5 round trips
    of a step (bench/dispatch.py --db pg). A connection that failed while in use is invalidated by
    SQLAlchemy's own disconnect handling and never returns to the pool."""
    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as err:  # the pool then retries the checkout on a new connection
            raise exc.DisconnectionError(f"pooled connection failed its ping: {err}") from err


def session(engine: Engine) -> Session:
    # expire_on_commit=False: rows stay readable after the commit that persisted them (we send replies
    # built from them only after committing).
    return Session(engine, expire_on_commit=False)
