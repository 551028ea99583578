"""farm.store.writes: the step session's write-behind buffer keeps the ORM's semantics. Reads in the session see
buffered writes, writes reach the database in the order they were made, a rollback drops them, and
``transition()`` in a step session writes the same rows as in a plain one (the whole table, both ways)."""
import itertools

import pytest
from sqlmodel import select

from farm.store.db import make_engine, session
from farm.store.models import Attempt, Event, Job, Task, User, Worker
from farm.store.states import JOB_TRANSITIONS, TASK_TRANSITIONS, IllegalTransition, TaskStatus, transition
from farm.store.writes import StaleRow, StepSession, add_row, add_to, set_values, update_by, update_row
from tests.conftest import BACKENDS, new_db_url


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tmp_path_factory):
    engine = make_engine(new_db_url(request, request.param, tmp_path_factory.mktemp("db")))
    yield engine
    engine.dispose()


@pytest.fixture
def job(engine) -> tuple[int, list[int]]:
    """A new active job with three queued tasks: (job id, task ids)."""
    with session(engine) as s:
        user = s.exec(select(User).where(User.name == "writes")).first() or User(name="writes", token_hash="w" * 64)
        s.add(user)
        s.flush()
        j = Job(owner_id=user.id, status="active", tasks_total=3)
        s.add(j)
        s.flush()
        tasks = [Task(job_id=j.id, index=i) for i in range(3)]
        s.add_all(tasks)
        s.commit()
        return j.id, [t.id for t in tasks]


def events(engine, task_id: int) -> list[tuple[str, str]]:
    with session(engine) as s:
        return [(e.old, e.new) for e in s.exec(select(Event).where(Event.task_id == task_id).order_by(Event.id))]


def test_buffered_writes_are_seen_by_the_session_and_written_once(engine, job):
    _, (t1, *_) = job
    with StepSession(engine) as s:
        task = s.get(Task, t1)
        set_values(s, task, worker_id="w1", progress_done=5)
        assert (task.worker_id, task.progress_done) == ("w1", 5), "the loaded row has the new values"
        assert task not in s.dirty and s.writes.updates, "buffered, not an ORM change"
        assert s.exec(select(Task.id).where(Task.worker_id == "w1")).all() == [t1], "a query sees the write"
        assert not s.writes.updates
        s.commit()
    with session(engine) as s:
        assert (s.get(Task, t1).worker_id, s.get(Task, t1).progress_done) == ("w1", 5)


def test_writes_land_in_the_order_they_were_made(engine, job):
    job_id, (t1, t2, _) = job
    with StepSession(engine) as s:
        task = s.get(Task, t1)
        task.error = "orm first"
        set_values(s, task, error="buffered second")
        s.commit()
    with StepSession(engine) as s:
        task = s.get(Task, t1)
        set_values(s, task, error="buffered first")
        task.error = "orm second"
        s.commit()
    with session(engine) as s:
        assert s.get(Task, t1).error == "orm second"

    # buffered transitions around an event added by the ORM (as farm.verify.verifier adds its notes)
    with StepSession(engine) as s:
        task = s.get(Task, t2)
        transition(s, task, TaskStatus.assigned, now=1.0)
        s.add(Event(at=1.0, kind="task", job_id=job_id, task_id=t2, old="assigned", new="assigned", detail="note"))
        transition(s, task, TaskStatus.running, now=1.0)
        s.commit()
    assert events(engine, t2) == [("queued", "assigned"), ("assigned", "assigned"), ("assigned", "running")]


def test_rollback_drops_buffered_writes(engine, job):
    job_id, (t1, *_) = job
    with StepSession(engine) as s:
        task = s.get(Task, t1)
        transition(s, task, TaskStatus.assigned)
        add_row(s, Attempt, task_id=t1, job_id=job_id, attempt=1, worker_id="w1")
        s.flush()  # sent in the transaction, not committed
        transition(s, task, TaskStatus.running)  # buffered only
        s.rollback()
        assert not s.writes.updates and not s.writes.inserts
        s.commit()
    with session(engine) as s:
        assert s.get(Task, t1).status == "queued"
        assert s.exec(select(Attempt).where(Attempt.task_id == t1)).all() == []
    assert events(engine, t1) == []


def test_insert_fills_defaults_and_update_by_key_updates_a_loaded_row(engine, job):
    job_id, (t1, *_) = job
    with StepSession(engine) as s:
        add_row(s, Attempt, task_id=t1, job_id=job_id, attempt=1, worker_id="w1", started_at=5.0)
        s.commit()
    with StepSession(engine) as s:
        att = s.exec(select(Attempt).where(Attempt.task_id == t1)).one()
        assert (att.outcome, att.render_seconds, att.error, att.ended_at) == ("leased", 0.0, "", None)
        update_row(s, Attempt, att.id, outcome="done", ended_at=9.0)
        assert (att.outcome, att.ended_at) == ("done", 9.0)
        s.commit()
    with session(engine) as s:
        assert s.get(Attempt, att.id).outcome == "done"


def test_fenced_update_lands_only_on_the_row_it_expects(engine, job):
    job_id, (t1, t2, t3) = job
    with session(engine) as s:  # t1, t2 leased to w1 at attempt 1
        for tid in (t1, t2):
            task = s.get(Task, tid)
            task.status, task.worker_id, task.attempt = "assigned", "w1", 1
            s.add(task)
        s.commit()
    expect = {"attempt": 1, "worker_id": "w1", "status": "assigned"}
    with StepSession(engine) as s:  # both still as expected: written, in one statement
        for tid in (t1, t2):
            s.writes.fence(Task, tid, expect)
            update_row(s, Task, tid, status="done", worker_id=None)
        s.commit()
    with session(engine) as s:
        assert [s.get(Task, t).status for t in (t1, t2, t3)] == ["done", "done", "queued"]
    with session(engine) as s:  # t3 leased to w2; a copy in memory says w1
        task = s.get(Task, t3)
        task.status, task.worker_id, task.attempt = "assigned", "w2", 1
        s.add(task)
        s.commit()
    with StepSession(engine) as s:
        s.writes.fence(Task, t3, expect)
        update_row(s, Task, t3, status="done", worker_id=None)
        update_row(s, Task, t3, progress_done=1)  # coalesced: still one fenced row
        with pytest.raises(StaleRow, match="1 of 1 fenced Task rows"):
            s.commit()
        s.rollback()
    with session(engine) as s:
        assert (s.get(Task, t3).status, s.get(Task, t3).worker_id) == ("assigned", "w2"), "nothing written"
    with StepSession(engine) as s:  # a fence is checked by the row's first write only: it holds the row after
        s.writes.fence(Task, t3, {**expect, "worker_id": "w2"})
        update_row(s, Task, t3, worker_id="w3")
        s.flush()
        update_row(s, Task, t3, status="running")
        s.commit()
    with session(engine) as s:
        assert (s.get(Task, t3).status, s.get(Task, t3).worker_id) == ("running", "w3")


@pytest.mark.parametrize("first", ["write", "read"])
def test_a_step_session_is_one_transaction_from_its_first_statement(engine, job, first):
    """On PostgreSQL the step's BEGIN rides its first statement (farm.store.begins): whichever comes first, the
    write pipeline or a read, everything after it is in the transaction, seen by nobody else until the
    commit and undone by a rollback; the connection goes back to the pool as it came."""
    job_id, (t1, *_) = job
    with StepSession(engine) as s:
        if first == "read":
            assert s.exec(select(Task.id).where(Task.id == t1)).all() == [t1]
        update_row(s, Task, t1, progress_done=7)
        s.flush()
        add_row(s, Event, kind="task", job_id=job_id, task_id=t1, detail="in-one-transaction")
        assert s.exec(select(Event.id).where(Event.detail == "in-one-transaction")).all(), "the session sees it"
        with session(engine) as other:
            assert other.get(Task, t1).progress_done != 7, "not committed: nobody else sees it"
            assert not other.exec(select(Event.id).where(Event.detail == "in-one-transaction")).all()
        s.rollback()
    with session(engine) as s:
        assert s.get(Task, t1).progress_done != 7
        assert not s.exec(select(Event.id).where(Event.detail == "in-one-transaction")).all()
    with StepSession(engine) as s:
        update_row(s, Task, t1, progress_done=8)
        s.commit()
    with engine.connect() as c:  # every pooled connection is back out of autocommit mode
        dbapi = c.connection.dbapi_connection
        assert not getattr(dbapi, "autocommit", False) and not c.info.get("farm_begin_deferred")
    with session(engine) as s:
        assert s.get(Task, t1).progress_done == 8


@pytest.mark.parametrize("pending", ["buffer", "orm", "nothing"])
def test_commit_calls_before_wait_once_and_commits_everything(engine, job, pending):
    """``StepSession.commit(before_wait)`` (the coordinator's on_commit) runs it exactly once, whether the
    buffer and the COMMIT go in one round trip (PostgreSQL, the ORM clean), the ORM has changes to flush
    after the buffer, or there is nothing to write; and everything is committed."""
    job_id, (t1, t2, _) = job
    calls = []
    with StepSession(engine) as s:
        if pending != "nothing":
            update_row(s, Task, t1, progress_done=11)
            add_row(s, Event, kind="task", job_id=job_id, task_id=t1, detail=f"before-wait-{pending}")
        if pending == "orm":
            task = s.get(Task, t2)
            task.progress_done = 12  # an ORM change, flushed after the buffer
            s.add(task)
        s.commit(before_wait=lambda: calls.append(1))
    assert calls == [1]
    with session(engine) as s:
        if pending != "nothing":
            assert s.get(Task, t1).progress_done == 11
            assert s.exec(select(Event.id).where(Event.detail == f"before-wait-{pending}")).all()
        if pending == "orm":
            assert s.get(Task, t2).progress_done == 12


AWKWARD_STRINGS = ["", "NULL", "null", " padded ", 'say "hi"', "back\\slash", "\\", '\\"', "{a,b}", "a,b", "tab\tnew\nline",
                   "\u3000wide\u2028space", "émoji 🎞", "'quote'"]
AWKWARD_FLOATS = [0.0, -0.0, 0.1, 1 / 3, 1e-300, 5e-324, 1.7976931348623157e308, -2.5, 1e16, float("inf"),
                  float("-inf"), 3]
AWKWARD_INTS = [0, -1, 2**31 - 1, -(2**31), 7]


def test_inserted_and_updated_values_read_back_exactly(engine, job):
    """Every value a buffered INSERT or UPDATE writes reads back as written (on PostgreSQL the columns go
    as array literals the buffer writes itself: quoting, NULL, the floats' shortest repr)."""
    job_id, (t1, *_) = job
    n = len(AWKWARD_STRINGS)
    with StepSession(engine) as s:
        for i, text in enumerate(AWKWARD_STRINGS):
            add_row(s, Event, at=AWKWARD_FLOATS[i % len(AWKWARD_FLOATS)], kind="task", job_id=job_id,
                    task_id=None if i % 3 == 0 else t1, attempt=AWKWARD_INTS[i % len(AWKWARD_INTS)],
                    worker_id=None if i % 2 else text, old=text, new=text[::-1], detail="awkward")
            add_row(s, Attempt, task_id=t1, job_id=job_id, attempt=100 + i, worker_id=text, started_at=1.0,
                    progressed=i % 3 == 0, error=text)
        s.commit()
    with session(engine) as s:
        attempts = s.exec(select(Attempt).where(Attempt.attempt >= 100).order_by(Attempt.attempt)).all()
        assert [(a.progressed, a.error, a.worker_id) for a in attempts] == [
            (i % 3 == 0, text, text) for i, text in enumerate(AWKWARD_STRINGS)]
    with session(engine) as s:
        rows = s.exec(select(Event).where(Event.detail == "awkward").order_by(Event.id)).all()
        assert len(rows) == n
        for i, (e, text) in enumerate(zip(rows, AWKWARD_STRINGS)):
            assert (e.old, e.new, e.worker_id) == (text, text[::-1], None if i % 2 else text)
            assert (e.task_id, e.attempt) == (None if i % 3 == 0 else t1, AWKWARD_INTS[i % len(AWKWARD_INTS)])
            f = AWKWARD_FLOATS[i % len(AWKWARD_FLOATS)]
            assert e.at == f, (e.at, f)  # (SQLite keeps no sign of zero)
        ids = [e.id for e in rows]
    with StepSession(engine) as s:  # updates of plain rows (by key) and of loaded ones, NULLs among values
        for i, eid in enumerate(ids):
            update_row(s, Event, eid, detail=AWKWARD_STRINGS[-1 - i], worker_id=None if i % 2 == 0 else "w",
                       at=AWKWARD_FLOATS[-1 - i % len(AWKWARD_FLOATS)])
        s.commit()
    with session(engine) as s:
        for i, eid in enumerate(ids):
            e = s.get(Event, eid)
            assert (e.detail, e.worker_id) == (AWKWARD_STRINGS[-1 - i], None if i % 2 == 0 else "w")
            assert e.at == AWKWARD_FLOATS[-1 - i % len(AWKWARD_FLOATS)]


def test_add_to_adds_in_the_database_and_update_by_names_a_unique_key(engine, job):
    job_id, (t1, *_) = job
    with session(engine) as s:
        s.add(Worker(id="adder", tasks_done=5, render_seconds=1.0))
        s.add(Attempt(task_id=t1, job_id=job_id, attempt=1, worker_id="adder", started_at=1.0))
        s.commit()
    with StepSession(engine) as s:
        w = s.get(Worker, "adder")
        s.commit()  # w stays loaded (expire_on_commit=False): a copy that goes stale
        with session(engine) as other:  # another transaction's change, made meanwhile
            o = other.get(Worker, "adder")
            o.tasks_done += 10
            other.add(o)
            other.commit()
        add_to(s, Worker, "adder", tasks_done=1, render_seconds=0.5)
        add_to(s, Worker, "adder", tasks_done=1, render_seconds=0.25)  # coalesced
        assert (w.tasks_done, w.render_seconds) == (7, 1.75), "the loaded row follows"
        update_by(s, Attempt, {"task_id": t1, "attempt": 1}, outcome="done", ended_at=2.0)
        s.commit()
    with session(engine) as s:
        w = s.get(Worker, "adder")
        assert (w.tasks_done, w.render_seconds) == (17, 1.75)
        att = s.exec(select(Attempt).where(Attempt.task_id == t1)).one()
        assert (att.outcome, att.ended_at) == ("done", 2.0)


def test_transition_table_through_the_buffer(engine, job):
    """Every move of both tables in a step session: the allowed ones write the row and one event, the
    others raise and buffer nothing."""
    job_id, (t1, *_) = job
    for kind, table in (("job", JOB_TRANSITIONS), ("task", TASK_TRANSITIONS)):
        model, key = (Job, job_id) if kind == "job" else (Task, t1)
        for old, new in itertools.product(table, table):
            with session(engine) as s:  # set the starting status without an event
                row = s.get(model, key)
                row.status = old.value
                s.commit()
            with StepSession(engine) as s:
                row = s.get(model, key)
                if new in table[old]:
                    transition(s, row, new, reason="table", attempt=1, worker_id="w")
                    s.commit()
                else:
                    with pytest.raises(IllegalTransition):
                        transition(s, row, new)
                    assert not s.writes.updates and not s.writes.inserts
                    s.rollback()
            with session(engine) as s:
                want = new.value if new in table[old] else old.value
                assert s.get(model, key).status == want, (kind, old, new)
                ev = s.exec(select(Event).where(Event.kind == kind).order_by(Event.id.desc())).first()
                if new in table[old]:
                    assert (ev.old, ev.new, ev.detail, ev.worker_id, ev.attempt) == (old.value, new.value, "table",
                                                                                     "w", 1)
