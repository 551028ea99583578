"""Pipelined leases end to end: one real `farm worker` (prefetch 1, its default) renders 8 frames of the
sample scene with no gap between renders. Asserted from the coordinator's rows, never from timings: each
next task was leased before the previous result was stored, and its render began (its first PROGRESS:
the task's ``running`` event) before the previous result was stored (that one uploaded meanwhile).

The frames are 160x120 at 16 samples (~0.1 s each here), not the suite's 64x48 at 4 (~15 ms): a render
shorter than the round trip that brings its successor's lease (the previous RESULT, READY, the step that
leases, TASK) leaves the slot idle with any prefetch depth of 1, as CI saw once (a 14 ms render ended
before the next lease arrived). Pipelining hides the round trip only behind a render that outlasts it."""
from __future__ import annotations

import pytest

from farm.store.db import make_engine
from farm.store.models import Attempt, Event
from tests.conftest import submit_sample, wait_job, wait_workers
from tests.fixtures_inproc import rows

pytestmark = pytest.mark.slow


def test_one_worker_renders_8_frames_without_a_gap_between_renders(farm, worker):
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = submit_sample(alice, "1-8", resolution_percent=50, samples=16)
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    engine = make_engine(f"sqlite:///{f.data / 'farm.db'}", upgrade=False)
    try:
        attempts = sorted(rows(engine, Attempt, Attempt.job_id == job["id"]), key=lambda a: a.started_at)
        events = rows(engine, Event, Event.job_id == job["id"], Event.kind == "task")
    finally:
        engine.dispose()
    assert [a.outcome for a in attempts] == ["done"] * 8 and {a.worker_id for a in attempts} == {"w1"}
    began = {e.task_id: e.at for e in events if e.new == "running"}
    renders = sorted(a.render_seconds for a in attempts)
    assert renders[len(renders) // 2] > 0.03, f"frames too short to say anything about gaps: {renders}"
    for prev, nxt in zip(attempts, attempts[1:]):
        assert nxt.started_at < prev.ended_at, "the next task was leased (prefetched) before the result came"
        assert began[nxt.task_id] < prev.ended_at, "the next render began while the previous result uploaded"
