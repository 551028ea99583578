"""Pipelined leases (farm/core/prefetch.py), driven through Coordinator.step: a worker that says HELLO with
``"prefetch": 1`` holds one lease more per slot than it renders, and that lease is fenced, ended and
watched like any other."""
from __future__ import annotations

import pytest

from common import limits as L
from common import protocol as P
from farm import constants as C
from farm.store.models import Attempt, Task
from tests.fixtures_inproc import (
    Driver,
    get,
    make_engine_and_store,
    make_job,
    make_user,
    new_coordinator,
    of,
    output_blob,
    rows,
)

DEAD = L.HEARTBEAT_INTERVAL * L.HEARTBEAT_LIVENESS + C.SWEEP_INTERVAL + 0.1


@pytest.fixture
def env(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    coord = new_coordinator(engine, blobs)
    yield engine, blobs, user, coord, Driver(coord)
    assert coord.stats["stale_cache"] == 0


def connect(d: Driver, ident: bytes, want: int, slots: int = 1, **caps) -> list[P.Task]:
    assert of(d.hello(ident, slots, **caps), P.Welcome, ident)
    return of(d.send((ident, P.Ready(want))), P.Task, ident)


def result_for(blobs, task: P.Task) -> P.Result:
    return P.Result(task.task_id, task.attempt, [output_blob(blobs, f) for f in task.spec["frames"]], 1.0)


def outcomes(engine, task_id) -> list[str]:
    return [a.outcome for a in rows(engine, Attempt, Attempt.task_id == task_id, order=Attempt.attempt)]


def test_a_worker_never_holds_more_than_one_lease_beyond_its_slots_whatever_it_asks(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-20")
    first = connect(d, b"pf", 10, prefetch=1)
    assert len(first) == 2                                    # slots + 1
    assert not of(d.send((b"pf", P.Ready(10))), P.Task)       # asking again gives nothing more
    assert len(connect(d, b"greedy", 10, prefetch=50)) == 2   # a depth past MAX_DEPTH is 1
    assert len(connect(d, b"plain", 10)) == 1                 # no prefetch: one a slot, as before
    assert not of(d.send((b"plain", P.Ready(1))), P.Task)     # READY repeated while holding it: nothing
    assert len(connect(d, b"two", 10, slots=2, prefetch=1)) == 4
    # a lease ends (RESULT): exactly one more
    out = d.send((b"pf", result_for(blobs, first[0])), (b"pf", P.Ready(10)))
    assert of(out, P.Ack)[0].accepted and len(of(out, P.Task, b"pf")) == 1
    held = [t for t in rows(engine, Task, Task.worker_id == "pf")]
    assert len(held) == 2


def test_cancel_of_the_job_returns_the_running_and_the_prefetched_lease(env):
    engine, blobs, user, coord, d = env
    job = make_job(engine, blobs, user, "1-4")
    a, b = connect(d, b"pf", 2, prefetch=1)
    d.send((b"pf", P.Progress(a.task_id, a.attempt, 0, 1, "inputs ready")))
    coord.cancel_job(job, user)
    cancels = {(m.task_id, m.attempt) for m in of(d.tick(), P.Cancel, b"pf")}
    assert cancels == {(a.task_id, a.attempt), (b.task_id, b.attempt)}
    assert outcomes(engine, a.task_id) == ["canceled"] and outcomes(engine, b.task_id) == ["canceled"]
    # its places are free again: a new job's tasks reach it
    make_job(engine, blobs, user, "1-2")
    assert len(of(d.send((b"pf", P.Ready(2))), P.Task, b"pf")) == 2


@pytest.mark.parametrize("how", ["bye", "silence"])
def test_a_disconnect_requeues_the_running_and_the_prefetched_lease(env, how):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    a, b = connect(d, b"pf", 2, prefetch=1)
    d.send((b"pf", P.Progress(a.task_id, a.attempt, 0, 1, "inputs ready")))
    if how == "bye":
        d.send((b"pf", P.Bye("stopping")))
    else:
        d.tick(DEAD)
        d.tick()
    for t in (a, b):
        row = get(engine, Task, t.task_id)
        assert (row.status, row.worker_id, outcomes(engine, t.task_id)) == ("queued", None, ["lost"])
    assert {t.task_id for t in connect(d, b"other", 2)} <= {a.task_id, b.task_id}


def test_a_stale_result_for_a_prefetched_attempt_after_its_expiry_is_refused(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    a, b = connect(d, b"pf", 2, prefetch=1)
    # the worker heart-beats only its first lease: the prefetched one is not renewed and runs out
    for _ in range(int(C.LEASE_SECONDS) + 3):
        d.send((b"pf", P.Heartbeat([[a.task_id, a.attempt]])), dt=1.0)
    assert outcomes(engine, b.task_id)[0] == "lost"
    row = get(engine, Task, b.task_id)  # leased again (to whoever had room: maybe pf itself) as a new attempt
    assert row.attempt == b.attempt + 1 and row.status == "assigned"
    ack = of(d.send((b"pf", result_for(blobs, b))), P.Ack, b"pf")[0]
    assert not ack.accepted and "stale" in ack.reason
    assert get(engine, Task, b.task_id).model_dump() == row.model_dump()  # the stale result changed nothing


def test_the_progress_watch_keeps_a_prefetched_lease_while_the_current_one_progresses_and_takes_both_back(env):
    """A waiting lease shows no progress of its own: it rides on the worker's visible progress on the lease
    it renders, for longer than the stall limit; when the worker stops progressing both run out."""
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-30", chunk=10)
    [t1] = connect(d, b"pf", 1, prefetch=1)
    d.send((b"pf", P.Progress(t1.task_id, t1.attempt, 0, 10, "inputs ready")))
    for i in range(1, 11):  # 2 s a frame: the job's measured unit
        d.send((b"pf", P.Progress(t1.task_id, t1.attempt, i, 10, f"frame {i}")), dt=2.0)
    out = d.send((b"pf", result_for(blobs, t1)), (b"pf", P.Ready(2)))
    t2, t3 = of(out, P.Task, b"pf")
    limit = max(C.LEASE_STALL_MIN, C.LEASE_STALL_FACTOR * 2.0)
    d.send((b"pf", P.Progress(t2.task_id, t2.attempt, 0, 10, "inputs ready")))
    held = [[t2.task_id, t2.attempt], [t3.task_id, t3.attempt]]
    for i in range(1, 10):  # a frame every limit / 3 s: t3 waits 3 × limit behind a render that progresses
        for _ in range(int(limit / 3)):
            d.send((b"pf", P.Heartbeat(held)), dt=1.0)
        d.send((b"pf", P.Progress(t2.task_id, t2.attempt, i, 10, f"frame {i}")))
    assert coord.stats["stalled"] == 0
    for t in (t2, t3):
        row = get(engine, Task, t.task_id)
        assert (row.worker_id, row.attempt) == ("pf", t.attempt) and row.status in ("assigned", "running")
    assert get(engine, Task, t3.task_id).status == "assigned"  # still waiting, not counted as running
    # the worker stops progressing: heartbeats alone keep neither lease
    for _ in range(int(limit + C.LEASE_SECONDS) + 5):
        d.send((b"pf", P.Heartbeat(held)), dt=1.0)
    assert coord.stats["stalled"] > 0
    for t in (t2, t3):  # both taken back (here to the same worker again: there is no other)
        assert outcomes(engine, t.task_id)[0] == "lost", t
        assert "no progress" in rows(engine, Attempt, Attempt.task_id == t.task_id)[0].error
        assert get(engine, Task, t.task_id).failed_workers == ["pf"]


def test_a_prefetched_lease_starts_its_own_clock_when_its_render_begins(env):
    """Its first PROGRESS moves it to running; its unit time is counted from there, not from the lease
    (else the wait behind the other render would double the job's measured frame)."""
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    a, b = connect(d, b"pf", 2, prefetch=1)
    d.send((b"pf", P.Progress(a.task_id, a.attempt, 0, 1, "inputs ready")))
    d.send((b"pf", P.Progress(a.task_id, a.attempt, 1, 1, "frame 1")), dt=5.0)
    d.send((b"pf", P.Progress(b.task_id, b.attempt, 0, 1, "inputs ready")))
    assert get(engine, Task, b.task_id).status == "running"
    d.send((b"pf", result_for(blobs, a)))
    d.send((b"pf", P.Progress(b.task_id, b.attempt, 1, 1, "frame 2")), dt=5.0)
    d.send((b"pf", result_for(blobs, b)))
    assert sorted(coord.progress.units[a.job_id]) == [5.0, 5.0]


def test_a_prefetched_lease_lost_with_its_worker_spends_none_of_the_tasks_attempts(env):
    """Found in review of prefetching: a worker that dies holding its current task and the next one cost
    the waiting task an attempt too, so crashing workers wore tasks out twice as fast (the chaos test
    failed a task on PostgreSQL: 'lost 5 leases'). A lease lost before it showed progress never started:
    it spends none of the task's attempts (the hard cap still bounds it). Here 6 workers each die holding
    the same two tasks, rendering them by turns: each task has 6 losses, 3 of them started — under
    TASK_MAX_ATTEMPTS, so neither fails (before: both failed at the 5th crash, and the job with them)."""
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    crashes = C.TASK_MAX_ATTEMPTS + 1
    for i in range(crashes):
        ident = f"crashy{i}".encode()
        got = sorted(connect(d, ident, 2, prefetch=1), key=lambda t: t.task_id)
        assert len(got) == 2, (i, [(t.id, t.status, t.attempt) for t in rows(engine, Task)])
        shown = got[i % 2]  # the one it renders; the other waits behind it
        d.send((ident, P.Progress(shown.task_id, shown.attempt, 0, 1, "rendering")))
        d.send((ident, P.Bye("crash")))
    for t in rows(engine, Task):
        assert t.status == "queued" and t.attempt == crashes, (t.id, t.status, t.attempt, t.error)
        assert sorted(a.progressed for a in rows(engine, Attempt, Attempt.task_id == t.id)) == \
            [False] * (crashes // 2) + [True] * (crashes // 2)


def test_a_worker_whose_loss_fails_the_job_drops_cleanly_with_its_other_lease(env):
    """Found with the test above: when one lost lease of a departing worker failed its job, the job's other
    tasks were canceled — its second lease among them — and losing that one next raised IllegalTransition
    (canceled → queued) in the step: the BYE was never processed. Now a lease ended earlier in the step is
    skipped."""
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1-2")
    for i in range(C.TASK_MAX_ATTEMPTS):
        ident = f"crashy{i}".encode()
        first = min(connect(d, ident, 2, prefetch=1), key=lambda t: t.task_id)
        d.send((ident, P.Progress(first.task_id, first.attempt, 0, 1, "rendering")))
        d.send((ident, P.Bye("crash")))
    from farm.store.models import Job
    assert get(engine, Job, job_id).status == "failed"
    assert sorted(t.status for t in rows(engine, Task)) == ["canceled", "failed"]
    assert not [w for w in coord.conns.values() if w.worker_id.startswith("crashy")], "every BYE was processed"


def test_a_task_goes_to_an_idle_worker_before_a_prefetch_slot_of_a_busy_one(env):
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-3")
    a1, a2 = connect(d, b"busy", 2, prefetch=1)  # renders frame 1, holds frame 2 behind it
    assert of(d.hello(b"idle", 1), P.Welcome, b"idle")
    # without the rule the busy worker would win the draw nearly always: it holds the scene, and its
    # reputation is far higher
    coord.conns[b"busy"].reputation, coord.conns[b"idle"].reputation = 1.0, 0.001
    out = d.send((b"busy", result_for(blobs, a1)), (b"busy", P.Ready(1)), (b"idle", P.Ready(1)))
    assert [t.spec["frames"] for t in of(out, P.Task, b"idle")] == [[3]]  # the last task: to the idle worker
    assert not of(out, P.Task, b"busy")
