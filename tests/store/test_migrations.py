"""Schema migrations on SQLite and PostgreSQL: a database with rows at revision 0001 (the schema before
migrations) is upgraded to head, keeps its rows, and then matches the models exactly; a database made by
``create_all`` before migrations existed (at 0001's or 0002's commit) is adopted; one that matches neither
is refused."""
from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, select, text
from sqlmodel import SQLModel

from farm.store import migrate
from farm.store.db import make_engine, session
from farm.store.models import Job, Task, User, Worker

# rows written at revision 0001, through that revision's own tables (reflected), not today's models
ROWS_0001 = {
    "user": [{"id": 1, "name": "alice", "token_hash": "a" * 64, "is_admin": False, "created_at": 1.0}],
    "job": [{"id": 7, "owner_id": 1, "name": "turntable", "kind": "blender", "status": "active", "priority": 2,
             "spec": {"frames": [1, 2], "scene_sha256": "b" * 64}, "tasks_total": 2, "tasks_accepted": 1,
             "tasks_failed": 0, "error": "", "created_at": 2.0, "updated_at": 3.0}],
    "task": [{"id": 70 + i, "job_id": 7, "index": i, "kind": "render", "priority": 2, "spec": {"frames": [i + 1]},
              "inputs": ["b" * 64], "status": status, "attempt": 1, "worker_id": "w1", "lease_expires": 99.5,
              "failed_workers": [], "error": "", "progress_done": 0, "progress_total": 1, "render_seconds": 1.25,
              "created_at": 2.0, "updated_at": 3.0} for i, status in enumerate(("accepted", "running"))],
    "attempt": [{"id": 1, "task_id": 70, "job_id": 7, "attempt": 1, "worker_id": "w1", "started_at": 2.5,
                 "ended_at": 3.0, "outcome": "done", "render_seconds": 1.25, "error": ""}],
    "worker": [{"id": "w1", "wallet": "0xabc", "hostname": "gpu1", "capabilities": {"runtimes": ["blender"]},
                "slots": 2, "online": True, "first_seen": 1.0, "last_seen": 3.0, "tasks_done": 1, "tasks_failed": 0,
                "render_seconds": 1.25}],
    "blob": [{"sha256": "b" * 64, "size": 1234, "origin": "upload", "created_at": 1.5}],
    "output": [{"id": 1, "job_id": 7, "task_id": 70, "attempt": 1, "frame": 1, "name": "frame_0001.png",
                "sha256": "c" * 64, "size": 99, "final": True, "worker_id": "w1", "render_seconds": 1.25,
                "created_at": 3.0}],
    "event": [{"id": 1, "at": 3.0, "kind": "task", "job_id": 7, "task_id": 70, "attempt": 1, "worker_id": "w1",
               "old": "running", "new": "done", "detail": ""}],
    "settlement": [{"job_id": 7, "epoch": 1, "escrow_job": "123456789012345678901234567890", "creator": "0xdef",
                    "status": "open", "estimate": "10" * 12, "deposit": "10" * 12, "deadline": 2_000_000_000,
                    "round": 0, "payout_round": 0, "payouts_hash": "", "payout_total": "0", "fee": "0",
                    "capped": False, "needs_payouts": True, "reject_pending": False, "reject_reason": "",
                    "error": "", "created_at": 2.0, "updated_at": 3.0}],
}


def open_at(url: str, revision: str):
    engine = make_engine(url, upgrade=False)
    migrate.upgrade(engine, revision)
    return engine


def write_rows(engine, rows: dict[str, list[dict]]) -> None:
    meta = MetaData()
    with engine.begin() as conn:
        meta.reflect(conn)
        for table, items in rows.items():  # in dependency order (foreign keys)
            conn.execute(meta.tables[table].insert(), items)


def read_rows(engine, rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The rows now stored, restricted to the columns that were written, in the order written."""
    meta = MetaData()
    with engine.connect() as conn:
        meta.reflect(conn)
        out = {}
        for table, items in rows.items():
            t = meta.tables[table]
            pk = list(t.primary_key.columns)
            got = [dict(r._mapping) for r in conn.execute(select(t).order_by(*pk))]
            out[table] = [{k: g[k] for k in items[0]} for g in got]
        return out


def model_diffs(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)


def revision_of(engine) -> str | None:
    with engine.connect() as conn:
        return migrate.current(conn)


def test_upgrade_from_0001_keeps_rows_and_matches_the_models(db_url):
    engine = open_at(db_url, migrate.BASELINE)
    assert revision_of(engine) == migrate.BASELINE
    write_rows(engine, ROWS_0001)
    engine.dispose()

    engine = make_engine(db_url)  # what `farm serve` does on start
    assert revision_of(engine) == migrate.head()
    assert read_rows(engine, ROWS_0001) == ROWS_0001
    assert model_diffs(engine) == [], "the migrations do not build the schema the models declare: write a " \
        "revision with `python -m farm.store.migrate revision MESSAGE`"
    with session(engine) as s:  # today's models read the old rows (new columns got values)
        assert s.get(User, 1).name == "alice"
        assert s.get(Job, 7).spec == ROWS_0001["job"][0]["spec"]
        assert [t.status for t in s.exec(select(Task).order_by(Task.index)).scalars()] == ["accepted", "running"]
        assert s.get(Worker, "w1").capabilities == {"runtimes": ["blender"]}
    engine.dispose()


def test_fresh_database_is_at_head_and_matches_the_models(db_url):
    engine = make_engine(db_url)
    assert revision_of(engine) == migrate.head()
    assert model_diffs(engine) == []
    engine.dispose()


def test_sizes_past_2_gib_and_times_past_2038_are_stored(db_url):
    from farm.store.ledger_models import Payout, Settlement
    from farm.store.models import Blob
    engine = make_engine(db_url)
    big = 3 * 2**30 + 7  # a 3 GiB blob: MAX_UPLOAD_BYTES is 4 GiB (PostgreSQL INTEGER stops at 2 GiB)
    with session(engine) as s:
        s.add(Blob(sha256="ab" * 32, size=big))
        user = User(name="u", token_hash="h")
        s.add(user)
        s.flush()
        job = Job(owner_id=user.id)
        s.add(job)
        s.flush()
        s.add(Settlement(job_id=job.id, escrow_job="1", deadline=2**33))
        s.add(Payout(job_id=job.id, round=1, worker_id="w", wallet="", work_ms=2**40, amount="0"))
        s.commit()
    with session(engine) as s:
        assert s.get(Blob, "ab" * 32).size == big
        assert s.exec(select(Settlement.deadline)).one()[0] == 2**33
        assert s.exec(select(Payout.work_ms)).one()[0] == 2**40
    engine.dispose()


@pytest.mark.parametrize("revision", list(migrate.CREATE_ALL_ERA))
def test_database_made_before_migrations_is_adopted(db_url, revision):
    # the revision without its alembic_version table: what create_all made at that commit
    engine = open_at(db_url, revision)
    write_rows(engine, {k: ROWS_0001[k] for k in ("user", "job")})
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {migrate.VERSION_TABLE}"))
    engine.dispose()

    engine = make_engine(db_url)
    assert revision_of(engine) == migrate.head()
    assert read_rows(engine, {"job": ROWS_0001["job"]}) == {"job": ROWS_0001["job"]}
    assert model_diffs(engine) == []
    engine.dispose()


def test_unversioned_database_that_differs_is_refused(db_url):
    engine = open_at(db_url, migrate.BASELINE)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {migrate.VERSION_TABLE}"))
        conn.execute(text("DROP TABLE taskdep"))
        conn.execute(text("CREATE TABLE mystery (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(migrate.SchemaMismatch) as err:
        make_engine(db_url)
    assert "table taskdep is missing" in str(err.value) and "table mystery is not in the schema" in str(err.value)
    engine = make_engine(db_url, upgrade=False)
    assert "alembic_version" not in inspect(engine).get_table_names(), "nothing was stamped"
    engine.dispose()


def test_postgresql_coordinators_starting_at_once_migrate_once(request, tmp_path):
    """On PostgreSQL the advisory lock lets one start migrate while the others wait, then find it done."""
    from tests.conftest import new_db_url
    url = new_db_url(request, "postgresql", tmp_path)
    errors, engines = [], []

    def start():
        try:
            engines.append(make_engine(url))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(engines) == 4
    assert revision_of(engines[0]) == migrate.head()
    for e in engines:
        e.dispose()
