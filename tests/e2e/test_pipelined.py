"""Pipelined leases end to end: one real `farm worker` (prefetch 1, its default) renders 8 frames of the
sample scene with no gap between renders. Asserted from the coordinator's rows, never from timings: each
next task was leased before the previous result was stored, and its render began (its first PROGRESS:
the task's ``running`` event) before the previous result was stored (that one uploaded meanwhile)."""
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
    job = submit_sample(alice, "1-8")
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
    for prev, nxt in zip(attempts, attempts[1:]):
        assert nxt.started_at < prev.ended_at, "the next task was leased (prefetched) before the result came"
        assert began[nxt.task_id] < prev.ended_at, "the next render began while the previous result uploaded"
