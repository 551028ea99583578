"""Queue position and ETA (issue 23, part 3), from the database as the API computes them: the work ahead
in claim order, only the workers able to run the job, seconds a task measured from the coordinator's own
timings. A real coordinator driven by ``step`` on a real SQLite file."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from common import protocol as P
from farm.store.db import session as new_session
from farm.store.models import Job
from farm.web.app import create_app
from farm.web.queue import queue_view
from tests.fixtures_inproc import Driver, make_engine_and_store, make_job, make_user, new_coordinator, of, output_blob


def view(engine, job_id):
    with new_session(engine) as s:
        return queue_view(s, s.get(Job, job_id))


def test_position_work_ahead_and_eta_follow_the_claim_order_and_the_measured_seconds(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, token = make_user(engine, "alice")
    a = make_job(engine, blobs, alice, frames="1-4")
    b = make_job(engine, blobs, alice, frames="1-2")
    urgent = make_job(engine, blobs, alice, frames="1-3", priority=5)
    d = Driver(new_coordinator(engine, blobs))
    assert view(engine, a)["note"].startswith("no online worker can run this job's tasks yet")
    assert view(engine, a)["eta_seconds"] is None
    d.hello(b"w1")
    d.hello(b"w2")
    qa, qb, qu = view(engine, a), view(engine, b), view(engine, urgent)
    assert (qu["position"], qu["tasks_ahead"], qu["tasks_left"]) == (1, 0, 3), "priority first"
    assert (qa["position"], qa["tasks_ahead"], qa["tasks_left"]) == (2, 3, 4)
    assert (qb["position"], qb["tasks_ahead"], qb["tasks_left"]) == (3, 7, 2)
    assert qa["slots_able"] == 2 and qa["basis"].startswith("default")
    assert qb["eta_seconds"] == pytest.approx((7 + 2) * qb["seconds_per_task"] / 2)

    # the urgent job's three frames render, each 4 s of the coordinator's clock: now measured
    for _ in range(3):
        t = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")[0]
        outs = [output_blob(blobs, f, f"{t.task_id}") for f in t.spec["frames"]]
        d.send((b"w1", P.Result(t.task_id, t.attempt, outs, 0.1)), (b"w2", P.Heartbeat([])), dt=4.0)
    assert view(engine, urgent) is None, "a rendered job has no queue figures"
    qb = view(engine, b)
    assert qb["seconds_per_task"] == pytest.approx(4.0) and "farm's last 3 render tasks" in qb["basis"]
    assert (qb["position"], qb["tasks_ahead"]) == (2, 4)
    assert qb["eta_seconds"] == pytest.approx((4 + 2) * 4.0 / 2)

    with TestClient(create_app(engine, blobs)) as http:
        got = http.get(f"/api/jobs/{b}", headers={"Authorization": f"Bearer {token}"}).json()["queue"]
        assert got == qb


def test_only_workers_able_to_run_the_job_count(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, _ = make_user(engine, "alice")
    job = make_job(engine, blobs, alice, frames="1-2")
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"sd-only", 4, runtimes=["diffusion"])
    q = view(engine, job)
    assert q["workers_able"] == 0 and q["eta_seconds"] is None, "a diffusion-only worker cannot render it"
    d.hello(b"gpu", 2)
    assert view(engine, job)["slots_able"] == 2


def test_a_trusted_or_top_tier_jobs_eta_counts_only_workers_of_that_tier(tmp_path):
    """A tier job is leased only to workers of its tier (farm.core.assignment): its ETA is theirs alone. Two
    new workers, one trusted (vouched), one top: an any-tier job is promised all three slots' worth, a
    trusted one two, a top one only the top worker's; a worker on probation counts for no job."""
    from farm.store.models import Worker
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, _ = make_user(engine, "alice")
    any_, trusted, top = (make_job(engine, blobs, alice, frames="1-6", **({"tier": t} if t else {}))
                          for t in ("", "trusted", "top"))
    d = Driver(new_coordinator(engine, blobs))
    for ident in (b"new1", b"new2", b"tr", b"tp", b"bad"):
        d.hello(ident)
    with new_session(engine) as s:
        for wid, tier in (("tr", "trusted"), ("tp", "top"), ("bad", "probation")):
            s.get(Worker, wid).tier = tier
        s.commit()
    q = {name: view(engine, j) for name, j in (("any", any_), ("trusted", trusted), ("top", top))}
    assert [q[n]["workers_able"] for n in ("any", "trusted", "top")] == [4, 2, 1], q
    per = q["top"]["seconds_per_task"]
    # the top job's 6 frames on its one worker; ahead of it the two earlier jobs' 12 tasks (claim order)
    assert q["top"]["eta_seconds"] == pytest.approx((12 + 6) * per / 1)
    assert q["trusted"]["eta_seconds"] == pytest.approx((6 + 6) * per / 2)
    assert q["any"]["eta_seconds"] == pytest.approx(6 * per / 4)
