"""Big jobs in bounded batches (issue 18): a job of MAX_TASKS_PER_JOB tasks is written in a few multi-row
statements, and its cancel ends the leased tasks at once and the rest CANCEL_BATCH at a time, by the
coordinator's sweeps: no step of the coordinator writes more than a batch (the 100,000-frame job used to
freeze the coordinator's thread for 30 s, and workers reconnected). A real coordinator driven by ``step``
on a real SQLite file; frames are leased to a worker so that the cancel has leases to revoke."""
from __future__ import annotations

from collections import Counter

from sqlmodel import func, select

from common import protocol as P
from farm import constants as C
from farm.store.db import session as new_session
from farm.store.models import Event, Job, Task
from tests.fixtures_inproc import Driver, make_engine_and_store, make_job, make_user, new_coordinator, of, rows


def test_a_20000_task_job_is_canceled_in_bounded_batches_and_nothing_is_left(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, _ = make_user(engine, "alice")
    job_id = make_job(engine, blobs, alice, frames=f"1-{C.MAX_TASKS_PER_JOB}")
    with new_session(engine) as s:
        assert s.exec(select(func.count()).select_from(Task).where(Task.job_id == job_id)).one() == 20_000
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"w1", slots=4)
    leased = of(d.send((b"w1", P.Ready(4))), P.Task, b"w1")
    assert len(leased) == 4
    d.coord.cancel_job(job_id, alice)
    with new_session(engine) as s:
        first = s.exec(select(func.count()).select_from(Event).where(Event.job_id == job_id)
                       .where(Event.new == "canceled").where(Event.kind == "task")).one()
    assert first == C.CANCEL_BATCH + 4, "the leased tasks and one batch at once, not all 20,000"
    steps, revoked = 0, []
    while rows(engine, Task, Task.job_id == job_id, Task.status != "canceled") and steps < 100:
        out = d.send((b"w1", P.Heartbeat([[t.task_id, t.attempt] for t in leased])), dt=C.SWEEP_INTERVAL)
        assert not of(out, P.Task), "nothing of a canceled job is leased"
        revoked += of(out, P.Cancel, b"w1")
        steps += 1
    assert steps >= (20_000 - first) // C.CANCEL_BATCH, "a batch per sweep"
    tasks = rows(engine, Task, Task.job_id == job_id)
    assert Counter(t.status for t in tasks) == {"canceled": 20_000}
    assert all(t.worker_id is None and t.lease_expires is None for t in tasks)
    events = rows(engine, Event, Event.job_id == job_id, Event.kind == "task", Event.new == "canceled")
    assert len(events) == 20_000 and len({e.task_id for e in events}) == 20_000, "each task's move is logged once"
    assert {e.old for e in events} == {"queued", "assigned"}
    assert {(c.task_id, c.attempt) for c in revoked} == {(t.task_id, t.attempt) for t in leased}, \
        "the worker is told to stop its four leases"


def test_one_stranger_saying_the_scene_is_broken_does_not_fail_the_job(tmp_path):
    """The attack: a worker leased any task answers FAILED, not retryable ("the scene's fault"), and the
    job failed at once. A new worker's word now sends the task to another worker first; it fails when a
    second worker fails it too (or when nobody else could try it)."""
    from farm.store.models import Job
    from tests.fixtures_inproc import get
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, _ = make_user(engine, "alice")
    job_id = make_job(engine, blobs, alice, frames="1")
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"liar")
    d.hello(b"w2")
    t = of(d.send((b"liar", P.Ready(1))), P.Task, b"liar")[0]
    d.send((b"liar", P.Failed(t.task_id, t.attempt, "the scene is corrupt (it is not)", False)))
    assert get(engine, Job, job_id).status != "failed" and d.coord.stats["scene_faults_doubted"] == 1
    again = of(d.send((b"w2", P.Ready(1)), (b"liar", P.Ready(1))), P.Task)
    assert [m.task_id for m in again] == [t.task_id], "the task went to the other worker"
    d.send((b"w2", P.Failed(t.task_id, again[0].attempt, "the scene is really broken", False)))
    assert get(engine, Job, job_id).status == "failed", "two workers agree: it is the scene"

    lone = make_job(engine, blobs, alice, frames="2")
    d2 = Driver(new_coordinator(engine, blobs))
    d2.hello(b"only")
    t = of(d2.send((b"only", P.Ready(1))), P.Task, b"only")[0]
    d2.send((b"only", P.Failed(t.task_id, t.attempt, "broken", False)))
    assert get(engine, Job, lone).status == "failed", "with nobody else to try it, the one report stands"


def test_a_cancel_left_half_done_is_finished_by_the_next_coordinator(tmp_path):
    """A coordinator that stopped between batches leaves a canceled job with queued tasks; the next one
    finds them once, at its first sweep (the sweeps do not scan the queue for them every time)."""
    from farm.kinds import jobs
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, _ = make_user(engine, "alice")
    job_id = make_job(engine, blobs, alice, frames=f"1-{2 * C.CANCEL_BATCH + 10}")
    with new_session(engine) as s:
        jobs.cancel_job(s, s.get(Job, job_id))  # one batch, then the process "stops"
        s.commit()
    left = rows(engine, Task, Task.job_id == job_id, Task.status != "canceled")
    assert len(left) == C.CANCEL_BATCH + 10
    d = Driver(new_coordinator(engine, blobs))
    for _ in range(4):
        d.tick(dt=C.SWEEP_INTERVAL)
    assert rows(engine, Task, Task.job_id == job_id, Task.status != "canceled") == []
    assert d.coord._canceling == set(), "done: nothing left to look at"
