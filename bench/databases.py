"""The databases a benchmark runs the farm on: a SQLite file, or PostgreSQL, one fresh database per run.

``--db`` takes a comma-separated list of backends, each measured side by side in one run:

* ``sqlite``: a file in the run's temporary directory (WAL, synchronous=FULL, as ``farm serve`` opens it);
* ``pg``: a throwaway PostgreSQL cluster started by this process with tests/pg.py's machinery (Debian's
  server, a temporary directory, loopback only), but with **durable** settings: ``fsync``, ``synchronous_commit``
  and ``full_page_writes`` left on (the test cluster turns all three off; a completion counted here has
  reached the disk, as on SQLite);
* ``postgresql://user@host:port/db``: an existing server; each run creates a database
  ``renderhive_bench_<pid>_<n>`` next to ``db`` (the user must be allowed to) and drops it afterwards.
  Its durability is whatever that server is configured with: the settings are printed.

Invariant: every run gets an empty database that is dropped afterwards, whatever the backend.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

DURABLE_OPTIONS = ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300", "-c", "fsync=on",
                   "-c", "synchronous_commit=on", "-c", "full_page_writes=on"]
_names = itertools.count(1)


class Backend:
    """One ``--db`` entry: ``label`` for the tables, ``fresh()`` for a run's database URL."""

    def __init__(self, spec: str):
        self.spec = spec
        self.server = None  # tests.pg.PgServer we started (pg)
        self.admin = ""     # a libpq URL of the server, for CREATE/DROP DATABASE (pg, postgresql://)
        if spec == "sqlite":
            self.label = "sqlite"
        elif spec == "pg":
            self.label = "postgresql"
        elif spec.startswith(("postgres://", "postgresql")):
            self.label = "postgresql"
            self.admin = make_url(spec).set(drivername="postgresql").render_as_string(hide_password=False)
        else:
            raise SystemExit(f"--db {spec!r}: give sqlite, pg (a throwaway cluster started here) or a "
                             "postgresql://user@host:port/db URL")

    def start(self) -> "Backend":
        if self.spec == "pg":
            from tests import pg  # the test cluster's machinery: finds Debian's server, runs it unprivileged
            try:
                self.server = pg.start_server(DURABLE_OPTIONS)
            except pg.PostgresUnavailable as exc:
                raise SystemExit(f"--db pg: {exc}") from None
            self.admin = self.server.url(driver="postgresql")
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def settings(self) -> str:
        """What makes a commit durable on this backend, as the server reports it."""
        if self.label == "sqlite":
            return "SQLite WAL, synchronous=FULL"
        import psycopg
        with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as conn:
            got = {k: conn.execute(f"SHOW {k}").fetchone()[0]
                   for k in ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")}
        where = "a cluster started here" if self.server is not None else "the given server"
        return (f"PostgreSQL {got.pop('server_version').split()[0]} ({where}, psycopg "
                f"{psycopg.__version__} {psycopg.pq.__impl__}): " + ", ".join(f"{k}={v}" for k, v in got.items()))

    def _admin_sql(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    @contextmanager
    def fresh(self, tmp: Path):
        """The URL of an empty database for one run (a file in ``tmp``, or a new PostgreSQL database)."""
        if self.label == "sqlite":
            yield f"sqlite:///{tmp / 'farm.db'}"
            return
        name = f"renderhive_bench_{os.getpid()}_{next(_names)}"
        self._admin_sql(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        try:
            yield make_url(self.admin).set(drivername="postgresql+psycopg", database=name).render_as_string(
                hide_password=False)
        finally:
            self._admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backends(spec: str) -> list[Backend]:
    """The backends of a ``--db`` value, started (call :func:`stop_all` when done)."""
    out: list[Backend] = []
    try:
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            out.append(Backend(part).start())
    except BaseException:
        stop_all(out)
        raise
    return out


def stop_all(bs: list[Backend]) -> None:
    for b in bs:
        b.stop()
