"""Write-behind for the coordinator's step: the rows one transaction changes, sent as a few executemany
statements instead of one ORM unit-of-work entry per object.

An ORM flush costs about ten times a Core executemany per row (object state, history, one statement per
dirty object), and the step's hot path (lease, RESULT, accept) writes ~8 rows per task: task updates,
Event and Attempt rows, Output rows, job and worker counters. :class:`StepSession` is the session of one
:meth:`farm.core.coordinator.Coordinator.step`; :func:`set_values` and :func:`add_row` write through its buffer
(and through plain ORM attributes on any other session, so the same code serves the API's sessions).

Invariants:

* a row updated through the buffer is updated in memory too (the session's instance, when loaded), with
  no ORM history, so reads in the step see the new values and the ORM never writes them a second time;
* writes reach the database in the order they were made: the buffer is written before every ORM
  statement of the session (a query sees it) and before every ORM flush, and a buffered write made while
  the ORM has unflushed changes flushes those first;
* nothing is written outside the session's transaction: a rollback drops the buffer with the session;
* a *fenced* row (:meth:`Writes.fence`: a row the coordinator read from memory, not from the database) is
  updated only while it still holds the fenced values: the update names them in its WHERE clause, and
  :class:`StaleRow` is raised (the step rolls back) when any such update matched no row.
"""
from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import JSON, Boolean, Float, and_, bindparam, event, insert, inspect, update
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState
from sqlmodel import Session

from farm.store import begins
from farm.store.pg_arrays import array_text_for


class StaleRow(Exception):
    """A fenced update matched no row: the database no longer holds what the in-memory copy said."""


class Writes:
    """The buffered updates (coalesced per row: one statement row per row and flush), increments and
    inserts of one session."""

    def __init__(self, session: "StepSession"):
        self.session = session
        self.updates: dict[tuple[type, tuple], dict[str, Any]] = {}
        self.adds: dict[tuple[type, tuple], dict[str, Any]] = {}     # column += value
        self.inserts: list[tuple[type, dict[str, Any]]] = []
        self.fences: dict[tuple[type, tuple], dict[str, Any]] = {}   # expected values of fenced rows
        self.statements = 0  # executemany statements sent (for benchmarks and tests)

    def clear(self) -> None:
        self.inserts.clear()
        self.updates.clear()
        self.adds.clear()
        self.fences.clear()

    def fence(self, model: type, pk: Any, expect: dict[str, Any]) -> None:
        """Update the row of ``model`` with primary key ``pk`` only where it still holds ``expect`` (its next
        buffered update checks it; :class:`StaleRow` when it does not). Once written, the row is held by
        this transaction, so later updates need no fence."""
        self.fences.setdefault((model, pk if isinstance(pk, tuple) else (pk,)), expect)

    def unfence(self, model: type, pk: Any) -> None:
        """Drop the fence of a row the caller has read again from the database (it is current now)."""
        self.fences.pop((model, pk if isinstance(pk, tuple) else (pk,)), None)

    def _order(self) -> None:
        # ORM changes made before this write must reach the database before it (they would come after
        # the buffer otherwise); _is_clean is the session's own O(1) test for pending changes.
        s = self.session
        if s._new or s._deleted or s.identity_map._modified:  # not s._is_clean(), inlined (hot)
            s.flush()

    def update(self, state: InstanceState, values: dict[str, Any]) -> None:
        self._order()
        _set_committed(state, values)
        key = (state.class_, state.identity)
        pending = self.updates.get(key)
        if pending is None:
            self.updates[key] = dict(values)
        else:
            pending.update(values)

    def update_key(self, model: type, pk: Any, values: dict[str, Any], key: tuple[str, ...] | None = None) -> None:
        """Update the row of ``model`` with primary key ``pk``, loaded or not; ``key``: the names of the
        (unique) columns ``pk`` gives, when not the primary key (the session's instance is not updated)."""
        self._order()
        pk = pk if isinstance(pk, tuple) else (pk,)
        if key is None:
            row = self.session.identity_map.get((model, pk, None))  # identity_key(model, pk), without its cost
            if row is not None:
                _set_committed(instance_state(row), values)
        self.updates.setdefault((model, pk) if key is None else (model, pk, key), {}).update(values)

    def add(self, model: type, pk: Any, deltas: dict[str, Any]) -> None:
        """``column += delta`` for the row of ``model`` with primary key ``pk`` (in the database, so that a
        stale in-memory copy cannot undo another change; the session's instance follows when loaded)."""
        self._order()
        pk = pk if isinstance(pk, tuple) else (pk,)
        row = self.session.identity_map.get((model, pk, None))  # identity_key(model, pk), without its cost
        if row is not None:
            state = instance_state(row)
            _set_committed(state, {k: state.dict[k] + d for k, d in deltas.items() if k in state.dict})
        pending = self.adds.setdefault((model, pk), {})
        for k, d in deltas.items():
            pending[k] = pending.get(k, 0) + d

    def insert(self, model: type, values: dict[str, Any]) -> None:
        self._order()
        for name, default in _python_defaults(model):  # what the ORM or Core would fill in
            if name not in values:
                values[name] = default.arg if default.is_scalar else default.arg(None)
        self.inserts.append((model, values))

    def flush(self, commit: bool = False, before_wait: Callable[[], None] | None = None) -> bool:
        """Write the buffer. With ``commit`` (the ORM has nothing left to flush), on PostgreSQL the
        transaction's COMMIT goes in the same pipeline as the writes, each fenced statement checking its
        count in the server (a mismatch fails it, so the COMMIT never runs): returns whether it was
        committed. ``before_wait``: called then, once everything is sent, before waiting for the server."""
        if not (self.inserts or self.updates or self.adds):
            return False
        inserts, updates, adds, fences = self.inserts, self.updates, self.adds, self.fences
        self.inserts, self.updates, self.adds = [], {}, {}
        conn = self.session.connection()
        pipe = _Pipeline.of(conn)
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for model, values in inserts:  # dicts keep first-seen order: rows of one table stay in order
            groups.setdefault((model, "insert", tuple(values), (), None), []).append(values)
        for op, changes in (("update", updates), ("add", adds)):
            for key, values in changes.items():
                model, pk = key[0], key[1]
                fence = fences.pop(key, None) if fences else None
                row = dict(zip(_PK_NAMES, pk))
                if fence:
                    for k, v in fence.items():
                        row[_fence_name(k)] = v
                row.update(values)
                groups.setdefault((model, op, tuple(sorted(values)), tuple(sorted(fence or ())),
                                   key[2] if len(key) > 2 else None), []).append(row)
        if pipe is None:
            for key, rows in groups.items():
                _check(key, rows, _compiled(conn.dialect, *key).run(conn, rows))
                self.statements += 1
            return False
        inline = commit and begins.deferred(conn.info)  # COMMIT is a statement like others on that connection
        committed = False
        try:
            for key, rows in groups.items():
                stmt = _compiled(conn.dialect, *key)
                if stmt.raw:
                    pipe.add(stmt, key, rows, checked=inline)
                else:  # through SQLAlchemy, which reads its result at once: what was queued goes first
                    pipe.sync()
                    _check(key, rows, stmt.run(conn, rows))
                self.statements += 1
            if inline and pipe.ctx is not None:
                pipe.commit()
                committed = True
                if before_wait is not None:
                    before_wait()
            pipe.sync()
        except Exception as exc:  # (a pipeline raises a failed statement's error at any later call)
            stale = _STALE.search(str(exc)) if getattr(exc, "sqlstate", None) == "22P02" else None
            if stale is None:
                raise
            matched, total, model = int(stale[1]), int(stale[2]), stale[3]
            raise StaleRow(f"{total - matched} of {total} fenced {model} rows changed in the database since they "
                           "were read") from exc
        finally:
            pipe.close()
        if committed:  # anything after this would begin a transaction of its own, never run outside one
            begins.rearm(conn.info)
        return committed


STALE_MARK = "farm: fenced rows changed, matched"
"""Text of the error a fenced statement checked in the server raises (a failed cast of this text, the
counts and the model: plain SQL has no RAISE), turned back into :class:`StaleRow` at the Sync."""
_STALE = re.compile(re.escape(STALE_MARK) + r" (\d+) of (\d+) (\w+)")


def _check(key: tuple, rows: list, matched: int) -> None:
    """A fenced statement (``key[3]`` names its fence columns) must have matched every row."""
    if key[3] and matched != len(rows):
        raise StaleRow(f"{len(rows) - matched} of {len(rows)} fenced {key[0].__name__} rows changed "
                       "in the database since they were read")


class _Pipeline:
    """PostgreSQL (psycopg): a flush's statements sent in one pipeline, with one Sync, so that the step
    waits for the server once instead of once per statement (psycopg's executemany alone opens and
    syncs a pipeline of its own per call). A step writes ~8 statements: on a loaded 2-core machine each
    round trip to the server process costs a context switch or two (bench/dispatch.py --db pg:
    27 waits for the server a step before). Matched row counts are read once the Sync has returned
    them; a failed statement raises at the Sync (or at a later call), and the session rolls back as for
    any error. The step's BEGIN (farm/store/begins.py) and, when committing, its COMMIT ride the same
    pipeline; the fenced statements then check their counts in the server, so a stale row fails its
    statement, the server skips the rest up to the Sync, COMMIT included, and nothing is committed."""

    def __init__(self, dbapi_conn, info: dict):
        self.dbapi = dbapi_conn
        self.info = info  # the connection's (farm.store.begin: a BEGIN it still owes)
        self.ctx = None
        self.queued: list[tuple[Any, tuple, list, bool]] = []  # (cursor, group key, rows, checked) before the Sync

    @staticmethod
    def of(conn) -> "_Pipeline | None":
        dbapi = conn.connection.dbapi_connection
        if hasattr(dbapi, "pipeline") and conn.dialect.name == "postgresql":
            return _Pipeline(dbapi, conn.info)
        return None

    def add(self, stmt: "_Compiled", key: tuple, rows: list, checked: bool = False) -> None:
        """Queue ``stmt`` for ``rows``; ``checked``: a fenced statement checks its count in the server."""
        if self.ctx is None:
            self.ctx = self.dbapi.pipeline()
            self.ctx.__enter__()
            if (begin := begins.owed(self.info)) is not None:  # the transaction's BEGIN, in the same round trip
                self.dbapi.execute(begin)
        cursor = self.dbapi.cursor()
        unnest = stmt.unnest
        checked = checked and unnest is not None and unnest.checked is not None
        self.queued.append((cursor, key, rows, checked))
        if checked:  # its count comes back as a row (a mismatch has failed it)
            cursor.execute(unnest.checked, (*unnest.params(rows), len(rows), len(rows)), binary=True)
        elif unnest is not None:  # one statement for all the rows
            cursor.execute(unnest.sql, unnest.params(rows), binary=True)  # binary: no quoting of each value
        else:  # rides the open pipeline: no Sync of its own
            cursor.executemany(stmt.sql, stmt.params(rows))

    def commit(self) -> None:
        """Queue the transaction's COMMIT behind the statements (the connection is in autocommit mode,
        farm.store.begins): when one of them fails, the server skips it and the transaction stays aborted."""
        self.dbapi.execute(b"COMMIT")

    def sync(self) -> None:
        """Send what is queued and wait for it; check the fenced statements' counts."""
        if self.ctx is None:
            return
        ctx, self.ctx = self.ctx, None
        ctx.__exit__(None, None, None)  # the Sync: raises the first failed statement's error
        queued, self.queued = self.queued, []
        for cursor, key, rows, checked in queued:
            _check(key, rows, cursor.fetchone()[0] if checked else cursor.rowcount)
            cursor.close()

    def close(self) -> None:
        """After an error: leave pipeline mode (the transaction is aborted; the session rolls back)."""
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            try:
                ctx.__exit__(None, None, None)
            except Exception:  # noqa: BLE001  (the error being raised already says what failed)
                pass
        for cursor, *_ in self.queued:
            cursor.close()
        self.queued = []


_PK_NAMES = tuple(f"_pk{i}" for i in range(8))  # a row's key columns as statement parameters


@functools.cache
def _fence_name(column: str) -> str:
    return f"_f_{column}"


def _set_committed(state: InstanceState, values: dict[str, Any]) -> None:
    """:func:`sqlalchemy.orm.attributes.set_committed_value` for several column attributes at once: the
    values become the loaded state, with no history for the ORM to flush."""
    state.dict.update(values)
    # state._commit(state.dict, values), without its set(keys).intersection(dict) per call
    committed = state.committed_state
    for k in values:
        committed.pop(k, None)
    state.expired = False
    if state.expired_attributes:
        state.expired_attributes.difference_update(values)
    if state.callables:
        for k in values:
            state.callables.pop(k, None)


@functools.cache
def _python_defaults(model: type) -> list[tuple[str, Any]]:
    return [(c.key, c.default) for c in model.__table__.columns
            if c.default is not None and (c.default.is_scalar or c.default.is_callable)]


class _Compiled:
    """An INSERT or UPDATE compiled once for a dialect, run with the driver's executemany. (SQLAlchemy's
    own executemany processes every parameter of every row in Python, which costs more than SQLite's work
    for these small rows.) Values go through the column types' bind processors, as SQLAlchemy would.
    ``op``: insert, update (``SET k = v``) or add (``SET k = k + v``); ``fence``: columns the row must
    still hold; ``by``: the unique columns naming the row, when not the primary key."""

    def __init__(self, dialect, model: type, op: str, keys: tuple[str, ...], fence: tuple[str, ...] = (),
                 by: tuple[str, ...] | None = None):
        table = model.__table__
        if op == "insert":  # inline: no RETURNING of the new ids (nobody reads them)
            stmt = insert(table).inline().values({k: bindparam(f"v_{k}") for k in keys})
            cols = {f"v_{k}": table.c[k] for k in keys}
        else:
            pks = inspect(model).primary_key if by is None else [table.c[k] for k in by]
            where = [c == bindparam(f"_pk{i}") for i, c in enumerate(pks)]
            where += [table.c[k] == bindparam(f"_f_{k}") for k in fence]
            values = {k: bindparam(f"v_{k}") if op == "update" else table.c[k] + bindparam(f"v_{k}") for k in keys}
            stmt = update(table).where(and_(*where)).values(values)
            cols = {**{f"_pk{i}": c for i, c in enumerate(pks)}, **{f"_f_{k}": table.c[k] for k in fence},
                    **{f"v_{k}": table.c[k] for k in keys}}
        self.stmt = stmt
        # a fenced update counts its rows: one statement per row where the driver cannot sum executemany's
        self.count_each = bool(fence) and not dialect.supports_sane_multi_rowcount
        # JSON values: the drivers' adaptation differs (psycopg needs SQLAlchemy's wrapping); those rare
        # statements go through SQLAlchemy's executemany
        self.raw = not any(isinstance(c.type, JSON) for c in cols.values())
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self.names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
        self.positional = compiled.positional
        procs = [cols[n].type.bind_processor(dialect) for n in self.names]
        if dialect.name == "sqlite":  # REAL affinity and sqlite3's own bool binding do what these do
            procs = [None if isinstance(cols[n].type, (Float, Boolean)) else p for n, p in zip(self.names, procs)]
        # parameter name → (row key, processor): row dicts hold column names (and _pk0 …)
        self.fields = [(n[2:] if n.startswith("v_") else n, p) for n, p in zip(self.names, procs)]
        names = [k for k, _p in self.fields]
        # no processor to run (SQLite's types, mostly): a row's parameters are one C call away
        self.plain = not any(procs) and self.positional
        self.getter = operator.itemgetter(*names) if len(names) > 1 else (lambda r, k=names[0]: (r[k],))
        self.unnest = (_Unnest(dialect, model, op, keys, fence, by) if dialect.name == "postgresql" and self.raw
                       else None)

    def params(self, rows: list[dict[str, Any]]) -> list:
        """The driver's parameters for ``rows``, through the columns' bind processors."""
        fields = self.fields
        if self.plain:
            return list(map(self.getter, rows))
        if self.positional:
            return [tuple(p(r[k]) if p else r[k] for k, p in fields) for r in rows]
        return [{n: (p(r[k]) if p else r[k]) for n, (k, p) in zip(self.names, fields)} for r in rows]

    def run(self, conn, rows: list[dict[str, Any]]) -> int:
        """Run for ``rows``; returns the number of rows the statement matched (updates)."""
        if self.count_each and len(rows) > 1:
            return sum(self.run(conn, [r]) for r in rows)
        if not self.raw:
            return conn.execute(self.stmt, [{n: r[k] for n, (k, _p) in zip(self.names, self.fields)}
                                            for r in rows]).rowcount
        params = self.params(rows)
        # the driver's own executemany, on the session's connection and transaction (SQLAlchemy's
        # exec_driver_sql costs ~10x SQLite's work for a statement of a few rows)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.executemany(self.sql, params)
            return cursor.rowcount
        finally:
            cursor.close()


_COMPILED: dict[tuple, _Compiled] = {}


def _compiled(dialect, model: type, op: str, keys: tuple[str, ...], fence: tuple[str, ...] = (),
              by: tuple[str, ...] | None = None) -> _Compiled:
    key = (type(dialect), dialect.paramstyle, model, op, keys, fence, by)
    stmt = _COMPILED.get(key)
    if stmt is None:
        stmt = _COMPILED[key] = _Compiled(dialect, model, op, keys, fence, by)
    return stmt


class _Unnest:
    """PostgreSQL: the same INSERT or UPDATE for all rows as **one** statement over arrays, one per column
    (``INSERT … SELECT * FROM unnest(%s::integer[], …)``, ``UPDATE … FROM unnest(…) AS v(…) WHERE …``),
    instead of executemany's one Bind/Execute per row, which the server plans and runs row by row and
    psycopg adapts row by row. The statement text does not depend on the number of rows, so psycopg
    prepares it once. Rows matched = the statement's row count (the keys of one group are distinct)."""

    def __init__(self, dialect, model: type, op: str, keys: tuple[str, ...], fence: tuple[str, ...],
                 by: tuple[str, ...] | None):
        table = model.__table__
        q = dialect.identifier_preparer
        t = q.format_table(table)
        if op == "insert":
            cols = [(k, table.c[k]) for k in keys]
        else:
            pks = list(inspect(table).primary_key) if by is None else [table.c[k] for k in by]
            cols = ([(f"_pk{i}", c) for i, c in enumerate(pks)] + [(f"_f_{k}", table.c[k]) for k in fence]
                    + [(k, table.c[k]) for k in keys])
        arrays = ", ".join(f"%s::{c.type.compile(dialect=dialect)}[]" for _k, c in cols)
        if op == "insert":
            self.sql = f"INSERT INTO {t} ({', '.join(q.quote(k) for k in keys)}) SELECT * FROM unnest({arrays})"
        else:
            v = {k: f"v.c{j}" for j, (k, _c) in enumerate(cols)}
            sets = ", ".join(f"{q.quote(k)} = " + (v[k] if op == "update" else f"{t}.{q.quote(k)} + {v[k]}")
                             for k in keys)
            where = [f"{t}.{q.quote(c.name)} = {v[f'_pk{i}']}" for i, c in enumerate(pks)]
            where += [f"{t}.{q.quote(k)} = {v[f'_f_{k}']}" for k in fence]
            self.sql = (f"UPDATE {t} SET {sets} FROM unnest({arrays}) AS v({', '.join(f'c{j}' for j in range(len(cols)))}) "
                        f"WHERE {' AND '.join(where)}")
        # a fenced update that checks its own count, for a pipeline that commits: it fails unless it matched
        # every row (the cast of text that is no integer; the text names the count, so it is not folded at
        # planning), and returns the count
        self.checked = None if not fence else (
            f"WITH u AS ({self.sql} RETURNING 1) SELECT CASE WHEN count(*) = %s THEN count(*) "
            f"ELSE CAST('{STALE_MARK} ' || count(*) || ' of ' || %s || ' {model.__name__}' AS bigint) END FROM u")
        self.fields = [(k, c.type.bind_processor(dialect), array_text_for(c.type)) for k, c in cols]

    def params(self, rows: list[dict[str, Any]]) -> tuple[Any, ...]:
        """One array per column, the values through the columns' bind processors: as the array's text
        when :func:`farm.store.pg_arrays.array_text_for` knows how to write it, else as a list for psycopg to adapt."""
        out = []
        for k, p, text in self.fields:
            values = [r[k] for r in rows] if p is None else [None if r[k] is None else p(r[k]) for r in rows]
            out.append(values if text is None else text(values))
        return tuple(out)


class StepSession(Session):
    """A session whose :func:`set_values` / :func:`add_row` writes are buffered until the next statement,
    flush or commit. ``expire_on_commit=False`` as in :func:`farm.store.db.session`."""

    def __init__(self, engine):
        super().__init__(engine, expire_on_commit=False)
        self.writes = Writes(self)

    def flush(self, objects=None) -> None:
        self.writes.flush()
        super().flush(objects)

    def commit(self, before_wait: Callable[[], None] | None = None) -> None:
        """Commit; ``before_wait`` is called once every statement is sent, before the commit waits for the
        database (the broker drains its socket meanwhile). On PostgreSQL, when the ORM has nothing to
        flush, the buffer's writes and the COMMIT go in one round trip (:meth:`Writes.flush`)."""
        if self._new or self._deleted or self.identity_map._modified:
            self.flush()  # the buffer, then the ORM's changes (made after it)
            committed = False
        else:
            committed = self.writes.flush(commit=True, before_wait=before_wait)
        if before_wait is not None and not committed:
            before_wait()
        super().commit()  # SQLAlchemy's bookkeeping and events; psycopg sends no COMMIT when it was sent
        self.writes.fences.clear()  # rows read, never written: nothing left to check

    def rollback(self) -> None:
        self.writes.clear()
        super().rollback()


# PostgreSQL: a step's BEGIN is sent with its first statement, in the write pipeline when that comes first
event.listen(StepSession, "after_begin", begins.defer)


@event.listens_for(StepSession, "do_orm_execute")
def _before_statement(state) -> None:  # every ORM statement, Session.get loads included
    state.session.writes.flush()


class PlainRow:
    """A row read as plain columns (not an ORM instance) that :func:`set_values` (and so
    :func:`farm.store.states.transition`) can still update: by primary key, through :func:`update_row`, and in
    the object itself. Subclasses name the mapped class in ``model``; ``id`` is the primary key."""
    __slots__ = ()
    model: type


def set_values(session, row: Any, **values: Any) -> None:
    """Set columns of ``row`` (a mapped instance of ``session``, or a :class:`PlainRow`): buffered in a
    step session, plain ORM attribute changes otherwise."""
    set_columns(session, row, values)


def set_columns(session, row: Any, values: dict[str, Any]) -> None:
    """:func:`set_values` with the columns in a dict (which the caller no longer changes)."""
    w = getattr(session, "writes", None)
    if isinstance(row, PlainRow):
        for k, v in values.items():
            setattr(row, k, v)
        if w is not None:  # update_row, without packing the values again
            w.update_key(row.model, row.id, values)
        else:
            update_row(session, row.model, row.id, **values)
        return
    if w is not None:
        state = instance_state(row)
        # persistent in this session (a new row is inserted by the ORM, with these values)
        if state.persistent and state.session_id == session.hash_key:
            w.update(state, values)
            return
    for k, v in values.items():
        setattr(row, k, v)
    session.add(row)


def add_row(session, model: type, **values: Any) -> None:
    """Insert a row nobody reads back in this transaction by its object (its id is not needed)."""
    w = getattr(session, "writes", None)
    if w is not None:
        w.insert(model, values)
    else:
        session.add(model(**values))


def update_row(session, model: type, pk: Any, **values: Any) -> None:
    """Update the row of ``model`` with primary key ``pk`` without loading it (buffered in a step session)."""
    w = getattr(session, "writes", None)
    if w is not None:
        w.update_key(model, pk, values)
        return
    row = session.get(model, pk)
    if row is not None:
        set_values(session, row, **values)


def update_by(session, model: type, key: dict[str, Any], **values: Any) -> None:
    """Update the row of ``model`` whose unique columns hold ``key``, without loading it."""
    w = getattr(session, "writes", None)
    if w is not None:
        w.update_key(model, tuple(key.values()), values, key=tuple(key))
        return
    session.exec(update(model).where(and_(*[getattr(model, k) == v for k, v in key.items()])).values(**values))


def add_to(session, model: type, pk: Any, **deltas: Any) -> None:
    """``column += delta`` for the row of ``model`` with primary key ``pk`` (buffered in a step session)."""
    w = getattr(session, "writes", None)
    if w is not None:
        w.add(model, pk, deltas)
        return
    pks = inspect(model).primary_key
    pk = pk if isinstance(pk, tuple) else (pk,)
    session.exec(update(model).where(and_(*[c == v for c, v in zip(pks, pk)]))
                 .values({k: getattr(model, k) + d for k, d in deltas.items()}))
