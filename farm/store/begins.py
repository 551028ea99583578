"""PostgreSQL: a step's ``BEGIN`` sent together with the step's first statements, not in a round trip of its own.

psycopg opens a transaction by sending ``BEGIN`` before the first statement and waiting for its answer, also
in pipeline mode (it syncs the pipeline after it): one more wait for the server in every step of the
coordinator, whose first statements are usually the write buffer's pipeline (farm/store/writes.py).
:func:`defer`, called as a :class:`farm.store.writes.StepSession` begins on a connection, puts that
psycopg connection in autocommit mode (psycopg then sends no BEGIN of its own) and records that it owes
one; whoever sends the transaction's first statement sends the BEGIN first: the write pipeline queues it
ahead of its statements (:func:`owed`, same round trip), and any other statement through SQLAlchemy sends
it just before (:func:`_begin_first`, as psycopg would have). ``ROLLBACK`` is psycopg's own (it sends it
whenever the server says a transaction is open, autocommit or not), and so is ``COMMIT``, unless the write
buffer queued it behind its last writes (:func:`deferred`; farm/store/writes.py): a step that writes is
then one round trip, BEGIN, statements and COMMIT.

Invariants:

* no statement of a step session runs outside its transaction: every statement either goes through
  SQLAlchemy's cursor execution (its ``before_cursor_execute`` event sends an owed BEGIN first) or
  through the write pipeline, which queues an owed BEGIN before anything else;
* a connection leaves autocommit mode before it goes back to the pool (its ``checkin`` event), so the
  API's sessions and everything else on the engine get psycopg's ordinary transactions; one that cannot
  (a transaction still open) is rolled back first, and invalidated if even that fails.

Measured (bench/dispatch.py --db pg, N = 50): 3 → 2 waits for the server in a step that writes (→ 1 with
the COMMIT in the pipeline too).
"""
from __future__ import annotations

import logging

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

log = logging.getLogger("farm.store.begins")

OWED = "farm_begin_owed"
"""``Connection.info`` key: the BEGIN statement the connection's transaction has not sent yet."""

DEFERRED = "farm_begin_deferred"
"""``Connection.info`` key: the connection was put in autocommit mode by :func:`defer` (undone at checkin);
the value is its BEGIN statement."""


def defer(_session, _transaction, connection) -> None:
    """``after_begin`` of a step session: on psycopg, send this transaction's BEGIN with its first
    statement (see the module docstring). Other drivers are left as they are."""
    if connection.dialect.name != "postgresql":
        return
    dbapi = connection.connection.dbapi_connection
    if (not hasattr(dbapi, "pipeline") or dbapi.autocommit or dbapi.pgconn.transaction_status != 0  # 0: IDLE
            or dbapi.read_only is not None or dbapi.deferrable is not None):  # a BEGIN we would not write alike
        return
    level = dbapi.isolation_level
    begin = b"BEGIN" if level is None else b"BEGIN ISOLATION LEVEL " + level.name.replace("_", " ").encode()
    dbapi.autocommit = True
    info = connection.info
    info[DEFERRED] = begin
    info[OWED] = begin


def owed(info: dict) -> bytes | None:
    """The BEGIN the connection owes (taken: the caller sends it before anything else), or None."""
    return info.pop(OWED, None) if info else None


def deferred(info: dict) -> bool:
    """Whether the connection's transaction is ours to end: COMMIT can be sent as a statement (the write
    buffer queues it behind its writes: farm/store/writes.py)."""
    return bool(info.get(DEFERRED))


def rearm(info: dict) -> None:
    """The transaction was committed by a statement: a statement after it owes a BEGIN again (so that
    nothing ever runs outside a transaction; the session commits whatever that one holds)."""
    if info.get(DEFERRED):
        info[OWED] = info[DEFERRED]


@event.listens_for(Engine, "before_cursor_execute")
def _begin_first(conn, cursor, _statement, _parameters, _context, _executemany) -> None:
    info = conn.info
    if OWED in info:
        cursor.execute(info.pop(OWED))


@event.listens_for(Pool, "checkin")
def _undefer(dbapi_conn, record) -> None:
    info = record.info
    if not info.pop(DEFERRED, False):
        return
    info.pop(OWED, None)
    if dbapi_conn is None:  # invalidated meanwhile
        return
    try:
        if dbapi_conn.pgconn.transaction_status != 0:  # not IDLE: the pool's reset left it open (never seen)
            dbapi_conn.rollback()
        dbapi_conn.autocommit = False
    except Exception as exc:  # noqa: BLE001  (a connection we cannot put back as it was is not reused)
        log.warning("pooled connection invalidated: could not leave autocommit mode: %s", exc)
        record.invalidate(exc)
