"""The ETA is honest (issue 23, part 3): on a real farm — `farm serve`, two sandboxed workers rendering the
sample scene — three jobs queued at once are each told, at submit, where they stand and when they will be
done; each job's first ETA is then compared with when it really was rendered. Payments are off here: a
deposit's seconds are not the queue's (the figures start when a job is funded)."""
from __future__ import annotations

import time

from tests.conftest import submit_sample, wait_job, wait_workers

FRAME = {"resolution_percent": 50, "samples": 24}  # 160x120: about a second a frame here, so the queue matters

ETA_ERROR_BOUND = 0.6
"""Largest |actual − ETA| allowed, as a share of the actual time to rendered, or 3 s whichever is more.
Measured on this 2-core machine (4 runs, 12 jobs): the ETA came out 0.4-1.4 s early, 8-41 % of the actual
2.3-5.5 s (frames of about a second, two workers, every frame of a new worker checked in full)."""


def test_each_queued_jobs_first_eta_is_within_the_stated_error_of_when_it_was_rendered(farm, worker):
    f = farm(env={"RENDERHIVE_CHAIN_RPC": "off"})
    for wid in ("w1", "w2"):
        worker(f, wid)
    alice = f.creator("alice")
    wait_workers(alice, 2)
    warm = submit_sample(alice, "1-2", **FRAME)  # history: the farm has timed frames of this scene
    assert wait_job(alice, warm["id"])["status"] == "rendered"
    subs = []
    for frames in ("1-4", "5-8", "9-12"):
        job = submit_sample(alice, frames, **FRAME)
        q = alice.job(job["id"])["queue"]
        subs.append((job["id"], time.monotonic(), q))
    first = subs[0][2]
    assert first["workers_able"] == 2 and first["slots_able"] == 2 and "this job" not in first["basis"]
    assert [q["position"] for _, _, q in subs][1:] == [2, 3], [q for _, _, q in subs]
    errors = []
    for job_id, t0, q in subs:
        assert wait_job(alice, job_id)["status"] == "rendered"
        actual = time.monotonic() - t0
        errors.append((job_id, round(q["eta_seconds"], 1), round(actual, 1)))
    print("ETA vs actual (s):", errors)
    for job_id, eta, actual in errors:
        assert abs(actual - eta) <= max(3.0, ETA_ERROR_BOUND * actual), (job_id, eta, actual, errors)
