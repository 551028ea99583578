"""The transition table, exhaustively: every allowed move works, every other raises and writes nothing."""
import itertools

import pytest
from sqlmodel import select

from farm.store.db import make_engine, session
from farm.store.models import Event, Job, Task, User
from farm.store.states import JOB_TRANSITIONS, TASK_TRANSITIONS, IllegalTransition, JobStatus, TaskStatus, transition
from tests.conftest import BACKENDS, new_db_url


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tmp_path_factory):
    """One database per backend for the whole table (SQLite file, PostgreSQL database)."""
    engine = make_engine(new_db_url(request, request.param, tmp_path_factory.mktemp("db")))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def owner(engine):
    with session(engine) as s:
        u = User(name="states", token_hash="x" * 64)
        s.add(u)
        s.commit()
        return u


def _row(engine, owner, kind, status):
    with session(engine) as s:
        job = Job(owner_id=owner.id, status=status if kind == "job" else "active")
        s.add(job)
        s.flush()
        if kind == "job":
            s.commit()
            return job
        task = Task(job_id=job.id, status=status)
        s.add(task)
        s.commit()
        return task


@pytest.mark.parametrize("kind, old, new", [
    (kind, old, new) for kind, enum_t in (("job", JobStatus), ("task", TaskStatus))
    for old, new in itertools.product(enum_t, enum_t)])
def test_transition_table(engine, owner, kind, old, new):
    table = JOB_TRANSITIONS if kind == "job" else TASK_TRANSITIONS
    row = _row(engine, owner, kind, old.value)
    with session(engine) as s:
        row = s.get(type(row), row.id)
        if new in table[old]:
            transition(s, row, new, reason="test", attempt=1, worker_id="w")
            s.commit()
            assert s.get(type(row), row.id).status == new.value
            ev = s.exec(select(Event).where(Event.kind == kind).order_by(Event.id.desc())).first()
            assert (ev.old, ev.new, ev.detail, ev.worker_id) == (old.value, new.value, "test", "w")
        else:
            before = s.exec(select(Event)).all()
            with pytest.raises(IllegalTransition):
                transition(s, row, new)
            s.rollback()
            assert s.get(type(row), row.id).status == old.value
            assert len(s.exec(select(Event)).all()) == len(before)


def test_terminal_states_have_no_way_out():
    assert JOB_TRANSITIONS[JobStatus.paid] == JOB_TRANSITIONS[JobStatus.canceled] == frozenset()
    assert TASK_TRANSITIONS[TaskStatus.canceled] == frozenset()
