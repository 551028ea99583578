"""RELEASE: a worker whose owner paused it hands a lease back. Driven through ``Coordinator.step``: the task
goes to another worker at once, the paused worker keeps its standing (no reputation evidence, no failure, not
blocked, not a staller), released attempts do not spend the task's attempts, and a stale RELEASE changes
nothing."""
from __future__ import annotations

from common import protocol as P
from farm import constants as C
from farm.store.models import Attempt, JobWorker, ReputationEvent, Task, Worker
from tests.core.test_coordinator import attempts, env, lease, snapshot  # noqa: F401  (env: fixture)
from tests.fixtures_inproc import get, make_job, of, rows


def standing(engine, worker_id: str) -> tuple:
    w = get(engine, Worker, worker_id)
    return (w.reputation, w.tier, w.tasks_failed, w.online)


def test_a_released_lease_goes_to_another_worker_without_penalty(env):  # noqa: F811
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1-2")
    [t] = lease(d, b"w1")
    d.send((b"w1", P.Progress(t.task_id, t.attempt, 0, 1, "inputs ready")))
    before = standing(engine, "w1")
    out = d.send((b"w1", P.Ready(0)), (b"w1", P.Release(t.task_id, t.attempt, "outside the schedule 22:00-08:00")))
    assert [(m.task_id, m.attempt, m.accepted) for m in of(out, P.Ack, b"w1")] == [(t.task_id, t.attempt, True)]
    assert not of(out, P.Task, b"w1"), "a paused worker (READY 0) gets no new lease"
    att = attempts(engine, t.task_id)[0]
    assert (att.outcome, att.error) == ("released", "handed back: outside the schedule 22:00-08:00")
    tasks = of(d.hello(b"w2", 2), P.Task) + of(d.send((b"w2", P.Ready(2))), P.Task, b"w2")
    assert sorted((m.task_id, m.attempt) for m in tasks) == sorted([(t.task_id, 2), (t.task_id + 1, 1)])
    assert standing(engine, "w1") == before
    assert rows(engine, ReputationEvent, ReputationEvent.worker_id == "w1") == []
    assert rows(engine, JobWorker, JobWorker.worker_id == "w1") == []
    assert get(engine, Task, t.task_id).failed_workers == []
    # still connected: READY again takes work (nothing is left for it here) and heartbeats are answered
    assert not of(d.send((b"w1", P.Heartbeat([]))), P.Disconnect)
    assert coord.stats["released"] == 1 and coord.stats["lost"] == 0 and coord.stats["stalled"] == 0


def test_a_stale_release_is_refused_and_changes_nothing(env):  # noqa: F811
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    [t] = lease(d, b"w1")
    lease(d, b"w2")
    before = snapshot(engine)
    out = d.send((b"w2", P.Release(t.task_id, t.attempt, "not mine")), (b"w1", P.Release(t.task_id, t.attempt + 1)))
    assert [m.accepted for m in of(out, P.Ack)] == [False, False]
    assert snapshot(engine) == before


def test_released_attempts_do_not_spend_the_tasks_attempts(env):  # noqa: F811
    engine, blobs, user, coord, d = env
    make_job(engine, blobs, user, "1")
    [t] = lease(d, b"w1")
    hands = [b"w1", b"w1", b"w2", b"w2", b"w3", b"w3"]  # more hand-backs than the task has attempts
    for i, ident in enumerate(hands):
        nxt = hands[i + 1] if i + 1 < len(hands) else b"w1"
        if nxt not in (c.identity for c in coord.conns.values()):
            d.hello(nxt, 1)
        out = d.send((ident, P.Release(t.task_id, t.attempt)), (nxt, P.Ready(1)))
        [t] = of(out, P.Task, nxt)
    assert t.attempt == len(hands) + 1 > C.TASK_MAX_ATTEMPTS
    out = d.send((b"w1", P.Failed(t.task_id, t.attempt, "out of memory", True)), (b"w1", P.Ready(0)))
    task = get(engine, Task, t.task_id)
    assert task.status == "queued", "one real failure after many hand-backs is not the task's last attempt"
    assert [a.outcome for a in rows(engine, Attempt, Attempt.task_id == t.task_id)].count("released") == len(hands)


def test_strangers_that_take_and_hand_back_cannot_wear_a_task_out(env):  # noqa: F811
    """Found in review: a release is free, and released attempts used to count against the task's hard cap
    (4 x TASK_MAX_ATTEMPTS), so sybils taking and handing back one task could end it — and its job — with
    one real failure after. Now releases never count, and a worker past RELEASES_PER_JOB hand-backs in a job
    takes none of its tasks any more."""
    engine, blobs, user, coord, d = env
    job_id = make_job(engine, blobs, user, "1")
    sybils = [f"s{i}".encode() for i in range(8)]
    released = 0
    for ident in sybils:
        got = lease(d, ident)
        for _ in range(C.RELEASES_PER_JOB + 2):
            if not got:
                break
            t = got[0]
            d.send((ident, P.Release(t.task_id, t.attempt, "paused")))
            released += 1
            got = of(d.send((ident, P.Ready(1))), P.Task, ident)
        assert not got, f"{ident} still takes the job's tasks after {C.RELEASES_PER_JOB} hand-backs"
        assert get(engine, JobWorker, (job_id, ident.decode())).blocked
        d.send((ident, P.Bye("gone")))
    assert released == len(sybils) * C.RELEASES_PER_JOB > 4 * C.TASK_MAX_ATTEMPTS
    [t] = lease(d, b"honest")
    d.send((b"honest", P.Failed(t.task_id, t.attempt, "driver reset", True)))
    assert get(engine, Task, t.task_id).status == "queued", "the task lives on after 32 hand-backs and a failure"
    assert rows(engine, ReputationEvent, ReputationEvent.worker_id == "s0") == []
