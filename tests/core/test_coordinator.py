"""The coordinator core, driven through ``Coordinator.step`` with encoded frames, a real SQLite file and
a real blob store; the clock is the ``now`` each step is given. Tests check replies and rows."""
from __future__ import annotations

import msgpack
import pytest

from common import limits as L
from common import protocol as P
from common.limits import PROTOCOL_HEADER
from farm import constants as C
from farm.kinds.jobs import JobError
from farm.store.db import session as new_session
from farm.store.models import Attempt, Blob, Event, Job, JobWorker, Output, Task, Worker
from tests.fixtures_inproc import (
    Driver,
    get,
    make_engine_and_store,
    make_job,
    make_user,
    new_coordinator,
    of,
    output_blob,
    put_scene,
    rows,
    sha256,
)

DEAD = L.HEARTBEAT_INTERVAL * L.HEARTBEAT_LIVENESS + C.SWEEP_INTERVAL + 0.1  # silence after which a worker is dropped


@pytest.fixture
def env(tmp_path, db_url):  # every test here runs on SQLite and on PostgreSQL
    engine, blobs = make_engine_and_store(tmp_path / "farm", url=db_url)
    user, _ = make_user(engine, "alice")
    coord = new_coordinator(engine, blobs)
    yield engine, blobs, user, coord, Driver(coord)
    # the in-memory copies (lease book, read-ahead) never went stale by the coordinator's own doing
    assert coord.stats["stale_cache"] == 0, "a batch had to be handled again from the database"


def tasks_of(engine, job_id) -> list[Task]:
    return rows(engine, Task, Task.job_id == job_id, order=Task.index)


def attempts(engine, task_id) -> list[Attempt]:
    return rows(engine, Attempt, Attempt.task_id == task_id, order=Attempt.attempt)


def snapshot(engine) -> dict:
    """Everything a stale message must not change."""
    return {m.__name__: sorted(repr(r.model_dump()) for r in rows(engine, m))
            for m in (Task, Attempt, Job, JobWorker, Output, Event)}


def lease(d: Driver, ident: bytes, n: int = 1, slots: int | None = None) -> list[P.Task]:
    """Connect ``ident`` (HELLO, READY n) and return the TASKs it was given."""
    assert of(d.hello(ident, slots or n), P.Welcome, ident)
    return of(d.send((ident, P.Ready(n))), P.Task, ident)


def result_for(blobs, task: P.Task, tag: str = "") -> P.Result:
    return P.Result(task.task_id, task.attempt, [output_blob(blobs, f, tag) for f in task.spec["frames"]], 1.5)


# ------------------------------------------------------------------ leases
def test_hello_ready_leases_in_priority_then_fifo_order(env):
    engine, blobs, user, coord, d = env
    a = make_job(engine, blobs, user, "1-2")
    b = make_job(engine, blobs, user, "5", priority=5)
    c = make_job(engine, blobs, user, "9")

    out = d.hello(b"w1", slots=4)
    assert out == [(b"w1", P.Welcome("w1", L.HEARTBEAT_INTERVAL, L.HEARTBEAT_LIVENESS, L.BLOB_CHUNK_SIZE,
                                      L.BLOB_CREDIT))]
    w = get(engine, Worker, "w1")
    assert w.online and w.slots == 4 and w.wallet == "0xwallet"

    first = of(d.send((b"w1", P.Ready(2))), P.Task, b"w1")
    second = of(d.send((b"w1", P.Ready(2))), P.Task, b"w1")
    assert [(t.job_id, t.spec["frames"]) for t in first + second] == [(b, [5]), (a, [1]), (a, [2]), (c, [9])]
    assert of(d.send((b"w1", P.Ready(4))), P.Task) == [], "nothing left to lease"

    for t in first + second:
        assert t.attempt == 1 and t.kind == "render" and t.lease_seconds == C.LEASE_SECONDS
        row = get(engine, Task, t.task_id)
        assert (row.status, row.attempt, row.worker_id) == ("assigned", 1, "w1")
        assert row.lease_expires == pytest.approx(d.now + C.LEASE_SECONDS)
        assert t.inputs == row.inputs == [row.spec["scene_sha256"]]
        assert t.spec["settings"]["format"] == "PNG"
        [att] = attempts(engine, t.task_id)
        assert (att.attempt, att.worker_id, att.outcome) == (1, "w1", "leased")
        ev = rows(engine, Event, Event.task_id == t.task_id, Event.new == "assigned")
        assert [(e.old, e.worker_id, e.attempt) for e in ev] == [("queued", "w1", 1)]
    for job_id in (a, b, c):
        assert get(engine, Job, job_id).status == "active"
        assert [(e.old, e.new) for e in rows(engine, Event, Event.kind == "job", Event.job_id == job_id)
                if e.old] == [("queued", "active")]


def test_worker_without_a_fitting_runtime_gets_nothing(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    d.send((b"w1", P.Hello("w1", "", 1, {"runtimes": ["diffusion"]})))
    assert of(d.send((b"w1", P.Ready(1))), P.Task) == []
    assert lease(d, b"w2") and get(engine, Task, 1).worker_id == "w2"


def test_progress_then_results_accept_tasks_and_render_the_job(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-4", chunk=2)
    t1, t2 = lease(d, b"w1", 2)
    assert t1.spec["frames"] == [1, 2] and t2.spec["frames"] == [3, 4]

    assert d.send((b"w1", P.Progress(t1.task_id, 1, 1, 2, "frame 1")), dt=5) == []
    row = get(engine, Task, t1.task_id)
    assert (row.status, row.progress_done, row.progress_total) == ("running", 1, 2)
    assert row.lease_expires == pytest.approx(d.now + C.LEASE_SECONDS), "PROGRESS renews the lease"
    assert [(e.old, e.new) for e in rows(engine, Event, Event.task_id == t1.task_id)][-1] == ("assigned", "running")

    res = result_for(blobs, t1)
    assert d.send((b"w1", res), dt=1) == [(b"w1", P.Ack(t1.task_id, 1, True))]
    row = get(engine, Task, t1.task_id)
    assert (row.status, row.worker_id, row.lease_expires, row.render_seconds) == ("accepted", None, None, 1.5)
    assert [(e.old, e.new) for e in rows(engine, Event, Event.task_id == t1.task_id)][-2:] == [
        ("running", "done"), ("done", "accepted")]
    [att] = attempts(engine, t1.task_id)
    assert (att.outcome, att.render_seconds, att.ended_at) == ("done", 1.5, d.now)
    outs = rows(engine, Output, Output.job_id == job_id, order=Output.frame)
    assert [(o.frame, o.name, o.sha256, o.size, o.attempt, o.worker_id) for o in outs] == [
        (o["frame"], o["name"], o["sha256"], o["size"], 1, "w1") for o in res.outputs]
    job = get(engine, Job, job_id)
    assert (job.status, job.tasks_accepted) == ("active", 1)

    assert of(d.send((b"w1", result_for(blobs, t2))), P.Ack) == [P.Ack(t2.task_id, 1, True)]
    job = get(engine, Job, job_id)
    assert (job.status, job.tasks_accepted) == ("rendered", 2)
    assert [o.frame for o in rows(engine, Output, Output.job_id == job_id)] == [1, 2, 3, 4]
    assert get(engine, Worker, "w1").tasks_done == 2


# ------------------------------------------------------------------ fencing
def test_stale_attempt_is_fenced_off_and_changes_nothing(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "7")
    [old] = lease(d, b"w1")
    assert lease(d, b"w2") == [], "one task only"

    # w1 goes silent; w2 keeps heart-beating. The sweep drops w1 and re-leases the task to w2.
    out = d.send((b"w2", P.Heartbeat()), dt=DEAD)
    assert of(out, P.Disconnect, b"w1")
    [new] = of(out, P.Task, b"w2")
    assert (new.task_id, new.attempt) == (old.task_id, 2)
    assert [(a.attempt, a.worker_id, a.outcome) for a in attempts(engine, old.task_id)] == [
        (1, "w1", "lost"), (2, "w2", "leased")]
    assert get(engine, Worker, "w1").online is False

    # the old socket is unknown now
    assert d.send((b"w1", result_for(blobs, old))) == [(b"w1", P.Disconnect(
        "unknown connection: reconnect and send HELLO first"))]
    # w1 comes back on a fresh socket, still believing it holds attempt 1
    assert of(d.send((b"w1b", P.Hello("w1", "", 1, {}, [[old.task_id, 1]]))), P.Welcome)
    before = snapshot(engine)
    out = d.send((b"w1b", result_for(blobs, old, "stale")), (b"w1b", P.Failed(old.task_id, 1, "oops", False)),
                 (b"w1b", P.Progress(old.task_id, 1, 1, 1)), (b"w1b", P.Heartbeat([[old.task_id, 1]])))
    assert [type(m).__name__ for _, m in out] == ["Ack", "Ack", "Cancel", "Cancel"]
    assert all(i == b"w1b" and m.task_id == old.task_id and m.attempt == 1 for i, m in out)
    assert [m.accepted for m in of(out, P.Ack)] == [False, False]
    assert snapshot(engine) == before, "stale messages change no rows"
    assert get(engine, Worker, "w1").tasks_failed == 0

    # the current attempt's result wins; a late re-send of the stale one is still rejected
    assert of(d.send((b"w2", result_for(blobs, new, "fresh"))), P.Ack) == [P.Ack(new.task_id, 2, True)]
    assert of(d.send((b"w1b", result_for(blobs, old, "stale"))), P.Ack)[0].accepted is False
    outs = rows(engine, Output, Output.job_id == job_id)
    assert [(o.frame, o.attempt, o.worker_id) for o in outs] == [(7, 2, "w2")], "exactly one output per frame"
    assert get(engine, Job, job_id).status == "rendered"


def test_leases_are_answered_from_memory_but_a_row_changed_behind_it_wins(env, caplog):
    """RESULTs of live leases are handled from the lease book (no read of the task), with every write fenced:
    a task requeued in the database by someone else (an operator's script, a second process) is refused."""
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-3")
    t1, t2, t3 = lease(d, b"w1", 3)
    assert len(coord.book) == 3
    assert of(d.send((b"w1", result_for(blobs, t1))), P.Ack) == [P.Ack(t1.task_id, 1, True)]
    assert coord.book.hits == 1 and len(coord.book) == 2, "answered from the book, and gone from it"
    with new_session(engine) as s:  # behind the coordinator's back: the lease of t2 is ended
        task = s.get(Task, t2.task_id)
        task.status, task.worker_id, task.lease_expires = "queued", None, None
        s.add(task)
        s.commit()
    with caplog.at_level("WARNING", logger="farm.core.coordinator"):
        out = d.send((b"w1", result_for(blobs, t2)), (b"w1", result_for(blobs, t3)))
    assert "handled again from the database" in caplog.text
    coord.stats["stale_cache"] = 0  # provoked on purpose
    assert sorted((m.task_id, m.accepted) for m in of(out, P.Ack)) == [(t2.task_id, False), (t3.task_id, True)]
    assert len(coord.book) == 0, "emptied: it was stale"
    task = get(engine, Task, t2.task_id)
    assert (task.status, task.attempt) == ("queued", 1), "the result of a lease that ended is not accepted"
    assert [o.frame for o in rows(engine, Output, Output.job_id == job_id, order=Output.frame)] == [1, 3]
    assert get(engine, Job, job_id).tasks_accepted == 2
    assert get(engine, Worker, "w1").tasks_done == 2


@pytest.mark.parametrize("case", ["missing frame", "extra frame", "not uploaded", "frame not an int",
                                  "bad sha"])
def test_result_that_does_not_deliver_is_refused_and_requeued(env, case):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-2", chunk=2)
    [t] = lease(d, b"w1")
    outputs = [output_blob(blobs, 1), output_blob(blobs, 2)]
    if case == "missing frame":
        outputs = outputs[:1]
    elif case == "extra frame":
        outputs.append(output_blob(blobs, 3))
    elif case == "not uploaded":
        outputs[1]["sha256"] = sha256(b"never uploaded")
    elif case == "frame not an int":
        outputs[1]["frame"] = "2"
    elif case == "bad sha":
        outputs[1]["sha256"] = "../../etc/passwd"
    out = d.send((b"w1", P.Result(t.task_id, 1, outputs, 1.0)))
    [ack] = of(out, P.Ack, b"w1")
    assert (ack.task_id, ack.attempt, ack.accepted) == (t.task_id, 1, False) and ack.reason
    row = get(engine, Task, t.task_id)
    assert (row.status, row.attempt, row.worker_id) == ("queued", 1, None)
    assert "invalid result" in row.error
    assert rows(engine, Output) == []
    assert attempts(engine, t.task_id)[0].outcome == "failed"
    assert get(engine, Job, job_id).status == "active"
    # the worker is free again and, as the only one, gets the retry
    [again] = of(d.send((b"w1", P.Ready(1))), P.Task)
    assert (again.task_id, again.attempt) == (t.task_id, 2)


def test_expired_lease_is_requeued_and_renewed_lease_is_kept(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    [t1] = lease(d, b"w1")
    [t2] = lease(d, b"w2")
    # both keep heart-beating; only w2 lists its task
    regrant = []
    for _ in range(int(C.LEASE_SECONDS) + 2):
        out = d.send((b"w1", P.Heartbeat([])), (b"w2", P.Heartbeat([[t2.task_id, 1]])), dt=1.0)
        assert not of(out, P.Disconnect)
        regrant += of(out, P.Task)
    [att1, att2] = attempts(engine, t1.task_id)
    assert (att1.outcome, att1.error) == ("lost", "lease expired")
    assert [(t.task_id, t.attempt) for t in regrant] == [(t1.task_id, 2)], "requeued with attempt + 1"
    assert (att2.worker_id, att2.outcome) == ("w1", "leased"), "the idle worker's slot was given back"
    row2 = get(engine, Task, t2.task_id)
    assert (row2.status, row2.attempt, row2.worker_id) == ("assigned", 1, "w2")
    assert row2.lease_expires > d.now + C.LEASE_SECONDS / 2
    assert [a.outcome for a in attempts(engine, t2.task_id)] == ["leased"]


def test_hello_after_a_coordinator_restart_keeps_listed_leases_only(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    t1, t2 = lease(d, b"w1", 2)
    d.send((b"w1", P.Progress(t1.task_id, 1, 0, 1)))

    d2 = Driver(new_coordinator(engine, blobs), now=d.now + 2)  # a new process on the same database
    assert of(d2.send((b"w1", P.Heartbeat([[t1.task_id, 1]]))), P.Disconnect), "unknown before HELLO"
    out = d2.send((b"w1x", P.Hello("w1", "", 2, {}, [[t1.task_id, 1]])))
    assert of(out, P.Welcome) and not of(out, P.Task), "no READY yet"
    r1, r2 = get(engine, Task, t1.task_id), get(engine, Task, t2.task_id)
    assert (r1.status, r1.attempt, r1.worker_id) == ("running", 1, "w1")
    assert r1.lease_expires == pytest.approx(d2.now + C.LEASE_SECONDS)
    assert (r2.status, r2.attempt, r2.worker_id) == ("queued", 1, None)
    assert attempts(engine, t2.task_id)[0].outcome == "lost"
    [again] = of(d2.send((b"w1x", P.Ready(1))), P.Task)
    assert (again.task_id, again.attempt) == (t2.task_id, 2)
    assert of(d2.send((b"w1x", result_for(blobs, t1))), P.Ack) == [P.Ack(t1.task_id, 1, True)]


# ------------------------------------------------------------------ failures
def test_retryable_failure_requeues_to_another_worker(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    assert of(d.hello(b"w1"), P.Welcome) and of(d.hello(b"w2"), P.Welcome)
    [t] = of(d.send((b"w1", P.Ready(1)), (b"w2", P.Ready(1))), P.Task)
    holder = get(engine, Task, t.task_id).worker_id.encode()
    other = b"w2" if holder == b"w1" else b"w1"
    out = d.send((holder, P.Failed(t.task_id, 1, "GPU out of memory", True)), (holder, P.Ready(1)))
    assert of(out, P.Ack, holder) == [P.Ack(t.task_id, 1, True)]
    [again] = of(out, P.Task)
    assert again.attempt == 2 and of(out, P.Task, other) == [again], "the retry prefers another worker"
    row = get(engine, Task, t.task_id)
    assert (row.failed_workers, row.error, row.status) == ([holder.decode()], "GPU out of memory", "assigned")
    assert [a.outcome for a in attempts(engine, t.task_id)] == ["failed", "leased"]
    assert get(engine, JobWorker, (t.job_id, holder.decode())).failures == 1


def test_non_retryable_failure_fails_the_job_and_cancels_other_leases(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-4")
    t0, t1, t2 = lease(d, b"w1", 3)
    out = d.send((b"w1", P.Failed(t0.task_id, 1, "the scene has no camera", False)))
    assert of(out, P.Ack) == [P.Ack(t0.task_id, 1, True)]
    assert sorted((c.task_id, c.attempt) for c in of(out, P.Cancel, b"w1")) == [(t1.task_id, 1), (t2.task_id, 1)]
    job = get(engine, Job, job_id)
    assert job.status == "failed" and "no camera" in job.error and job.tasks_failed == 1
    assert [t.status for t in tasks_of(engine, job_id)] == ["failed", "canceled", "canceled", "canceled"]
    assert [a.outcome for t in (t0, t1, t2) for a in attempts(engine, t.task_id)] == ["failed", "canceled", "canceled"]
    assert all(t.worker_id is None for t in tasks_of(engine, job_id))
    # late messages about the canceled leases are stale
    assert of(d.send((b"w1", result_for(blobs, t1))), P.Ack)[0].accepted is False
    assert rows(engine, Output) == []


def test_job_failure_ends_attempts_of_workers_not_yet_reconnected(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-3")
    t0, t1 = lease(d, b"w1", 2)
    d2 = Driver(new_coordinator(engine, blobs), now=d.now + 1)  # restart; w1 has not reconnected yet
    assert of(d2.hello(b"w2"), P.Welcome)
    [t2] = of(d2.send((b"w2", P.Ready(1))), P.Task)
    d2.send((b"w2", P.Failed(t2.task_id, 1, "broken scene", False)))
    assert get(engine, Job, job_id).status == "failed"
    assert [t.status for t in tasks_of(engine, job_id)] == ["canceled", "canceled", "failed"]
    assert [a.outcome for t in (t0, t1) for a in attempts(engine, t.task_id)] == ["canceled", "canceled"]
    # when w1 comes back listing them, it is told to stop
    out = d2.send((b"w1", P.Hello("w1", "", 2, {}, [[t0.task_id, 1], [t1.task_id, 1]])),
                  (b"w1", P.Heartbeat([[t0.task_id, 1], [t1.task_id, 1]])))
    assert sorted(c.task_id for c in of(out, P.Cancel, b"w1")) == [t0.task_id, t1.task_id]


def test_worker_failing_too_often_is_blocklisted_for_the_job(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-40")  # more queued tasks than one assignment round looks at
    [t] = lease(d, b"w1")
    for n in range(1, C.JOB_WORKER_FAILURE_LIMIT + 1):
        out = d.send((b"w1", P.Failed(t.task_id, t.attempt, f"crash {n}", True)), (b"w1", P.Ready(1)))
        assert of(out, P.Ack)[0].accepted
        tasks = of(out, P.Task, b"w1")
        if n < C.JOB_WORKER_FAILURE_LIMIT:
            [t] = tasks  # alone, it still gets work of the job
        else:
            assert tasks == [], "blocklisted: no more tasks of this job"
    jw = get(engine, JobWorker, (job_id, "w1"))
    assert (jw.failures, jw.blocked) == (C.JOB_WORKER_FAILURE_LIMIT, True)
    assert get(engine, Job, job_id).status == "active", "worker failures alone do not fail the job"

    # a later job still goes to w1, however many tasks of the blocked job are ahead; this job's go to w2
    other = make_job(engine, blobs, user, "50")
    [o] = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    assert o.job_id == other
    got = lease(d, b"w2", 3)
    assert {g.job_id for g in got} == {job_id} and len(got) == 3
    assert of(d.send((b"w1", P.Ready(1))), P.Task) == []


def test_task_failed_by_distinct_workers_fails(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1")
    for n in range(1, C.TASK_DISTINCT_WORKER_FAILURES + 1):
        ident = f"w{n}".encode()
        [t] = lease(d, ident)
        assert t.attempt == n
        assert of(d.send((ident, P.Failed(t.task_id, n, "segfault", True))), P.Ack)[0].accepted
    row = get(engine, Task, t.task_id)
    assert row.status == "failed" and row.failed_workers == ["w1", "w2", "w3"]
    job = get(engine, Job, job_id)
    assert job.status == "failed" and "segfault" in job.error


# ------------------------------------------------------------------ connections and malformed input
def test_bye_requeues_at_once(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    [t] = lease(d, b"w1")
    assert lease(d, b"w2") == []
    out = d.send((b"w1", P.Bye("shutting down")))
    assert [(i, m.task_id, m.attempt) for i, m in out if isinstance(m, P.Task)] == [(b"w2", t.task_id, 2)]
    assert attempts(engine, t.task_id)[0].outcome == "lost"
    assert get(engine, Worker, "w1").online is False
    assert of(d.send((b"w1", P.Ready(1))), P.Disconnect, b"w1")


def test_second_hello_takes_over_the_worker_id(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    [t] = lease(d, b"old")
    out = d.send((b"new", P.Hello("old", "", 1, {}, [[t.task_id, 1]])))
    assert of(out, P.Disconnect, b"old") and of(out, P.Welcome, b"new")
    assert get(engine, Task, t.task_id).worker_id == "old"
    assert of(d.send((b"new", result_for(blobs, t))), P.Ack) == [P.Ack(t.task_id, 1, True)]


GARBAGE = [
    [b"RHIVE/1", b"\x01"],                                            # two frames
    [b"RHIVE/9", b"\x02", msgpack.packb({"free_slots": 1})],         # another version
    [PROTOCOL_HEADER, b"\x7f", msgpack.packb({})],                    # unknown command
    [PROTOCOL_HEADER, b"\x02", b"\xc1\xc1"],                          # not msgpack
    [PROTOCOL_HEADER, b"\x02", msgpack.packb([1])],                   # not a map
    [PROTOCOL_HEADER, b"\x02", msgpack.packb({"free_slots": "1"})],   # wrong type
    [PROTOCOL_HEADER, b"\x02", msgpack.packb({"free_slots": 1, "x": 1})],  # unknown field
    [PROTOCOL_HEADER, b"\x01", msgpack.packb({"worker_id": "w1"})],   # missing fields
    [b""],
]


@pytest.mark.parametrize("frames", GARBAGE, ids=range(len(GARBAGE)))
def test_malformed_frames_get_error_and_serving_goes_on(env, frames):
    engine, blobs, user, coord, d = env
    out = d.send((b"w1", frames))
    [(ident, err)] = out
    assert ident == b"w1" and isinstance(err, P.Error) and err.reason.startswith("malformed message")
    assert coord.stats["malformed"] == 1
    assert of(d.hello(b"w1"), P.Welcome, b"w1"), "a valid HELLO right after is answered"


def test_batch_mixing_valid_and_garbage_messages(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    out = d.send((b"w1", P.Hello("w1", "", 2, {})), (b"w1", GARBAGE[3]), (b"w1", P.Ready(2)),
                 (b"w2", GARBAGE[1]), (b"w3", P.Ready(1)), (b"w1", P.Welcome("w1", 1.0, 3, 1, 1)),
                 (b"w4", P.Hello("", "", 1, {})), (b"w5", P.Hello("w5", "", 0, {})))
    kinds = [(i, type(m).__name__) for i, m in out]
    assert kinds == [(b"w1", "Welcome"), (b"w1", "Error"), (b"w2", "Error"), (b"w3", "Disconnect"),
                     (b"w1", "Error"), (b"w4", "Error"), (b"w5", "Error"), (b"w1", "Task"), (b"w1", "Task")]
    assert "not a worker message" in out[4][1].reason
    assert [t.status for t in rows(engine, Task)] == ["assigned", "assigned"]
    assert {w.id for w in rows(engine, Worker)} == {"w1"}


@pytest.mark.parametrize("caps", [{"runtimes": 5}, {"runtimes": [["blender"]]}, {"cached": 5},
                                  {"cached": [{"sha": 1}]}])
def test_hello_with_malformed_capabilities_cannot_stall_assignment(env, caps):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    out = d.send((b"bad", P.Hello("bad", "", 1, caps)), (b"bad", P.Ready(1)))
    assert [type(m).__name__ for _, m in out] == ["Error", "Disconnect"]
    assert "lists of strings" in out[0][1].reason
    assert [t.spec["frames"] for t in lease(d, b"good", 2)] == [[1], [2]], "the others are still served"


def test_invalid_result_in_a_batch_does_not_spoil_the_others(env):
    """A RESULT whose outputs are of the wrong type is refused like any bad result; the batch commits."""
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    t1, t2 = lease(d, b"w1", 2)
    bad = result_for(blobs, t1)
    bad.outputs[0]["frame"] = str(bad.outputs[0]["frame"])
    out = d.send((b"w1", bad), (b"w1", result_for(blobs, t2)), (b"w1", P.Heartbeat([[t1.task_id, 1]])))
    refused, accepted = of(out, P.Ack)
    assert (refused.task_id, refused.accepted) == (t1.task_id, False) and "malformed outputs" in refused.reason
    assert accepted == P.Ack(t2.task_id, 1, True)
    assert not of(out, P.Error)
    assert [t.status for t in rows(engine, Task, order=Task.id)] == ["queued", "accepted"]


# ------------------------------------------------------------------ cancel
def test_cancel_job_revokes_leases_and_is_idempotent(env):
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-3")
    t0, t1 = lease(d, b"w1", 2)
    d.send((b"w1", P.Progress(t0.task_id, 1, 0, 1)))
    view = coord.cancel_job(job_id, user)
    assert view["status"] == "canceled" and view["tasks"]["canceled"] == 3
    out = d.tick(0.1)
    assert sorted((i, c.task_id, c.attempt) for i, c in out if isinstance(c, P.Cancel)) == [
        (b"w1", t0.task_id, 1), (b"w1", t1.task_id, 1)]
    assert [t.status for t in tasks_of(engine, job_id)] == ["canceled"] * 3
    assert [a.outcome for t in (t0, t1) for a in attempts(engine, t.task_id)] == ["canceled", "canceled"]
    assert get(engine, Job, job_id).status == "canceled"

    events = len(rows(engine, Event))
    assert coord.cancel_job(job_id, user)["status"] == "canceled"
    assert d.tick(0.1) == [] and len(rows(engine, Event)) == events, "canceling again changes nothing"
    assert of(d.send((b"w1", result_for(blobs, t0))), P.Ack)[0].accepted is False
    assert rows(engine, Output) == []

    mallory, _ = make_user(engine, "mallory")
    with pytest.raises(JobError) as exc:
        coord.cancel_job(job_id, mallory)
    assert exc.value.status == 404


# ------------------------------------------------------------------ blobs over the worker plane
def test_blob_get(env):
    engine, blobs, user, coord, d = env
    data = bytes(range(256)) * 2048  # 512 KiB
    sha = blobs.write_bytes(data)
    assert of(d.send((b"w1", P.BlobGet(sha, 0, 10))), P.Disconnect), "HELLO first"
    d.hello(b"w1")
    [(_, blob)] = d.send((b"w1", P.BlobGet(sha, 0, 10)))
    assert blob.data == b"" and "not an input of a task you hold" in blob.error, "blobs go by need only"
    make_job(engine, blobs, user, "1")
    [task] = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    with new_session(engine) as s:  # a task whose inputs name the blob (and two hashes never uploaded)
        row = s.get(Task, task.task_id)
        row.inputs = [*row.inputs, sha, sha256(b"nope"), "not-a-hash"]
        s.add(row)
        s.commit()
    [(_, blob)] = d.send((b"w1", P.BlobGet(task.inputs[0], 0, 10)))
    assert blob.error == "" and blob.data, "its own task's scene"
    [(_, blob)] = d.send((b"w1", P.BlobGet(sha, 1000, 300)))
    assert blob == P.Blob(sha, 1000, len(data), data[1000:1300])
    [(_, blob)] = d.send((b"w1", P.BlobGet(sha, 5, 10 * L.BLOB_CHUNK_SIZE)))
    assert blob.data == data[5:5 + L.BLOB_CHUNK_SIZE], "at most one chunk"
    [(_, blob)] = d.send((b"w1", P.BlobGet(sha, len(data) - 7, 100)))
    assert blob.data == data[-7:] and blob.total == len(data)
    [(_, blob)] = d.send((b"w1", P.BlobGet(sha, len(data) + 5, 100)))
    assert (blob.data, blob.error, blob.total) == (b"", "", len(data))
    for unknown in (sha256(b"nope"), "not-a-hash"):
        [(_, blob)] = d.send((b"w1", P.BlobGet(unknown, 0, 100)))
        assert blob.error == "unknown blob" and blob.data == b""


def test_a_project_lease_names_its_manifest_only_and_may_fetch_the_files_it_names(env):
    """A 300-file project: each task row holds two hashes (scene, manifest) instead of 301; the lease
    holder may fetch every file of the manifest, a worker without the lease none, and nobody a blob the
    manifest does not name."""
    engine, blobs, user, coord, d = env
    scene = put_scene(blobs)
    files = [{"path": "shot.blend", "sha256": scene}]
    files += [{"path": f"tex/{i:03d}.png", "sha256": blobs.write_bytes(b"\x89PNG %d" % i)} for i in range(300)]
    stranger = blobs.write_bytes(b"another creator's texture")
    job_id = make_job(engine, blobs, user, "1-3", scene=scene, project={"scene": "shot.blend", "files": files})
    tasks = tasks_of(engine, job_id)
    msha = tasks[0].spec["project"]["manifest_sha256"]
    assert [t.inputs for t in tasks] == [[scene, msha]] * 3, "the manifest stands for the project's files"
    d.hello(b"w1")
    d.hello(b"w2")
    [task] = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    assert task.inputs == [scene, msha]
    for f in (files[1], files[150], files[300]):
        [(_, blob)] = d.send((b"w1", P.BlobGet(f["sha256"], 0, 100)))
        assert blob.error == "" and blob.data.startswith(b"\x89PNG"), f["path"]
    for who, sha in ((b"w2", files[1]["sha256"]), (b"w1", stranger)):
        [(_, blob)] = d.send((who, P.BlobGet(sha, 0, 100)))
        assert blob.data == b"" and "not an input of a task you hold" in blob.error


def test_blob_put_needs_a_lease(env):
    engine, blobs, user, coord, d = env
    d.hello(b"w1")
    data = b"x" * 100
    [(_, ack)] = d.send((b"w1", P.BlobPut(sha256(data), 0, len(data), data)))
    assert ack.error == "uploads need a task lease" and not ack.done
    assert not blobs.has(sha256(data)) and blobs.partial_offset(sha256(data)) == 0


def test_blob_put_probe_chunks_resume_and_verify(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    lease(d, b"w1")
    data = bytes(range(256)) * 40  # 10240 bytes, sent in chunks of 4096
    sha = sha256(data)
    put = lambda off, chunk=None: d.send(  # noqa: E731
        (b"w1", P.BlobPut(sha, off, len(data), data[off:off + 4096] if chunk is None else chunk)))

    assert put(0, b"") == [(b"w1", P.BlobAck(sha, 0, False))], "a probe says where to start"
    assert put(0) == [(b"w1", P.BlobAck(sha, 4096, False))]
    assert put(8192) == [], "a chunk ahead of the stored bytes is not taken nor acked"
    assert put(0) == [], "nor one behind"
    assert put(0, b"") == [(b"w1", P.BlobAck(sha, 4096, False))], "the probe gives the resume point"
    assert not blobs.has(sha)
    assert put(4096) == [(b"w1", P.BlobAck(sha, 8192, False))]
    assert put(8192) == [(b"w1", P.BlobAck(sha, len(data), True))]
    assert blobs.read(sha, 0, len(data)) == data
    assert get(engine, Blob, sha).origin == "worker" and get(engine, Blob, sha).size == len(data)
    assert put(0, b"") == [(b"w1", P.BlobAck(sha, len(data), True))], "stored already: done at once"

    # bytes that do not hash to the declared sha are discarded, and the upload starts over
    fake = sha256(b"something else")
    assert d.send((b"w1", P.BlobPut(fake, 0, 100, b"a" * 60))) == [(b"w1", P.BlobAck(fake, 60, False))]
    [(_, ack)] = d.send((b"w1", P.BlobPut(fake, 60, 100, b"a" * 40)))
    assert ack.error and "hash" in ack.error and not ack.done
    assert not blobs.has(fake) and get(engine, Blob, fake) is None
    assert d.send((b"w1", P.BlobPut(fake, 0, 100, b""))) == [(b"w1", P.BlobAck(fake, 0, False))]

    # a declared size over the limit is refused before anything is written
    [(_, ack)] = d.send((b"w1", P.BlobPut(sha256(b"big"), 0, blobs.max_bytes + 1, b"")))
    assert "limit" in ack.error



def test_a_failing_batch_is_rolled_back_without_losing_slots_or_the_assignment_round(env, monkeypatch):
    """A handler bug rolls the transaction back; the lease it contained must not eat the worker's slot."""
    engine, blobs, user, coord, d = env
    job = make_job(engine, blobs, user, "1-2")
    d.hello(b"w1", slots=1)
    boom = {"n": 1}
    real_lease = coord.assignment._lease

    def flaky_lease(*args, **kwargs):
        real_lease(*args, **kwargs)
        if boom["n"]:
            boom["n"] -= 1
            raise RuntimeError("simulated bug after a lease")
    monkeypatch.setattr(coord.assignment, "_lease", flaky_lease)
    tasks = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    assert len(tasks) == 1  # the retry leased again, once
    leased = [t for t in tasks_of(engine, job) if t.status == "assigned"]
    assert [(t.id, t.attempt) for t in leased] == [(tasks[0].task_id, tasks[0].attempt)]
    assert tasks[0].attempt == 1


def test_dependent_task_waits_then_gets_the_outputs_it_needs(env):
    """A task that needs others (a tile assembly, a video encode) stays waiting until they are accepted,
    then is queued with their outputs as inputs; intermediate outputs are not the job's results."""
    from farm.kinds import jobs
    from farm.kinds.frames import TaskPlan
    from farm.store.db import session as new_session
    from farm.store.models import User
    from farm.store.states import TaskStatus
    from tests.fixtures_inproc import put_scene
    engine, blobs, user, coord, d = env
    scene = put_scene(blobs)
    plans = [TaskPlan("render", {"frames": [1], "scene_sha256": scene}, [scene], ["frame_0001.png"], final=False),
             TaskPlan("render", {"frames": [2], "scene_sha256": scene}, [scene], ["frame_0002.png"], final=False),
             TaskPlan("render", {"frames": [1, 2], "scene_sha256": scene}, [], ["frame_0001.png.x", "frame_0002.png.x"],
                      needs=[0, 1])]
    with new_session(engine) as s:
        job = jobs.store_plans(s, s.get(User, user.id), "blender", "deps", 0, {}, plans, "test")
        s.commit()
        job_id = job.id
    first = lease(d, b"w1", n=3)
    assert len(first) == 2 and all(t.spec["outputs"][0].startswith("frame_000") for t in first)
    assert tasks_of(engine, job_id)[2].status == TaskStatus.waiting.value
    for t in first:
        d.send((b"w1", result_for(blobs, t)))
    third = tasks_of(engine, job_id)[2]
    assert third.status in ("queued", "assigned")
    inter = rows(engine, Output, Output.job_id == job_id)
    assert third.spec["input_names"] == {o.name: o.sha256 for o in inter}
    assert sorted(third.inputs) == sorted(o.sha256 for o in inter)
    assert not any(o.final for o in inter)
    task = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    task = task[0] if task else None
    if task is None:  # leased already in the round that released it
        t3 = tasks_of(engine, job_id)[2]
        task = P.Task(t3.id, t3.attempt, job_id, 30.0, t3.kind, t3.spec, t3.inputs)
    outs = [{**output_blob(blobs, i + 1, "final"), "name": n} for i, n in enumerate(task.spec["outputs"])]
    assert of(d.send((b"w1", P.Result(task.task_id, task.attempt, outs, 1.0))), P.Ack)[0].accepted
    assert get(engine, Job, job_id).status == "rendered"
    with new_session(engine) as s:
        assert [o.name for o in jobs.outputs(s, s.get(Job, job_id))] == ["frame_0001.png.x", "frame_0002.png.x"]


def test_a_farm_that_requires_sandboxes_refuses_unsandboxed_workers(env):
    """`farm serve --require-sandbox`: a worker that says it runs scenes unconfined (--no-sandbox) is
    disconnected with the fix and gets no Worker row and no work; a sandboxed one is served."""
    engine, blobs, user, coord, d = env
    coord.require_sandbox = True
    make_job(engine, blobs, user, "1-2")
    out = d.hello(b"bare", sandbox="none")
    assert [type(m).__name__ for _, m in out] == ["Disconnect"]
    assert "sandboxed workers only" in out[0][1].reason and "without --no-sandbox" in out[0][1].reason
    assert of(d.send((b"bare", P.Ready(1))), P.Task) == [] and {w.id for w in rows(engine, Worker)} == set()
    d.hello(b"boxed", sandbox="bubblewrap 0.8.0, seccomp, uid 61000+slot")
    assert [t.spec["frames"] for t in of(d.send((b"boxed", P.Ready(1))), P.Task, b"boxed")] == [[1]]


def test_a_lease_without_progress_is_taken_back_though_its_worker_heartbeats(env):
    """The attack: a worker takes a lease and does nothing but heartbeat, which used to renew it for ever.
    Leases need progress: once the job has measured frames, a task that shows none for LEASE_STALL_FACTOR
    × the job's median frame (at least LEASE_STALL_MIN) is no longer renewed, runs out, and is leased to
    another worker; a worker that makes progress keeps its lease."""
    engine, blobs, user, coord, d = env
    job = make_job(engine, blobs, user, "1-2")
    [t1] = lease(d, b"w1", 1)
    d.send((b"w1", P.Progress(t1.task_id, t1.attempt, 1, 1, "frame 1")), dt=2.0)
    assert of(d.send((b"w1", result_for(blobs, t1))), P.Ack)[0].accepted  # a frame takes 2 s here
    [t2] = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    assert of(d.hello(b"w2"), P.Welcome)
    assert not of(d.send((b"w2", P.Ready(1))), P.Task)  # free, nothing left to lease
    limit = max(C.LEASE_STALL_MIN, C.LEASE_STALL_FACTOR * 2.0)
    for _ in range(int(limit + C.LEASE_SECONDS) + 5):  # heartbeats every second, no progress
        d.send((b"w1", P.Heartbeat([[t2.task_id, t2.attempt]])), (b"w2", P.Heartbeat([])), dt=1.0)
    row = get(engine, Task, t2.task_id)
    assert (row.worker_id, row.attempt, row.failed_workers) == ("w2", t2.attempt + 1, ["w1"]), row
    again = P.Task(row.id, row.attempt, job, 0, "render", {}, [])
    assert coord.stats["stalled"] > 0
    lost = [a for a in rows(engine, Attempt, Attempt.task_id == t2.task_id) if a.worker_id == "w1"]
    assert [a.outcome for a in lost] == ["lost"] and "no progress" in lost[0].error
    # the same time with progress: the lease holds
    d.send((b"w2", P.Progress(again.task_id, again.attempt, 0, 1, "inputs ready")), dt=1.0)
    for i in range(int(limit) - 5):
        d.send((b"w2", P.Heartbeat([[again.task_id, again.attempt]])), dt=1.0)
    assert get(engine, Task, again.task_id).worker_id == "w2"
    assert get(engine, Job, job).status == "active"


def test_heartbeats_queued_behind_a_backlog_are_not_silence_for_a_bounded_time(tmp_path):
    """A thousand workers reconnecting at once keep the coordinator busy for seconds: steps with full
    batches. A worker whose heartbeats wait unread behind them is not dropped, for BACKLOG_GRACE seconds."""
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    coord = new_coordinator(engine, blobs)
    d = Driver(coord)
    assert of(d.hello(b"quiet"), P.Welcome)
    assert of(d.hello(b"busy"), P.Welcome)
    flood = [(b"busy", P.Heartbeat())] * C.BATCH_MAX_MESSAGES  # a full batch: more is waiting
    d.send(*flood, dt=L.HEARTBEAT_INTERVAL * L.HEARTBEAT_LIVENESS + 1)
    assert b"quiet" in coord.conns, "dropped while its heartbeats may be queued behind the backlog"
    d.send((b"quiet", P.Heartbeat()), dt=0.1)  # the backlog read: its heartbeat was there
    assert b"quiet" in coord.conns
    # a backlog that never ends: silence counts again after the grace
    for _ in range(3):
        d.send(*flood, dt=C.BACKLOG_GRACE / 2)
    assert b"quiet" not in coord.conns and b"busy" in coord.conns
