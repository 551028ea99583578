"""Rejections are bounded (issue 17): reject-and-re-render must not be a way to get renders unpaid. A
creator may send a job back MAX_REJECT_ROUNDS_PER_JOB times and reject at most MAX_JOB_REJECT_SHARE of its
tasks; across their jobs, at most MAX_CREATOR_REJECT_RATE of what was delivered (past a small grace). The
real review code on a coordinator driven by ``step``, SQLite or PostgreSQL, and the embedded EVM."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from farm import constants as C
from farm.kinds import jobs
from farm.store.db import session as new_session
from farm.store.models import Attempt, Task
from farm.web import review
from farm.web.app import create_app
from tests.fixtures_inproc import rows
from tests.payments.test_ledger import farm, rendered_job, wallet_of  # noqa: F401  (fixture)


def frames_of(f, job_id: int, worker: str) -> list[int]:
    with new_session(f.engine) as s:
        return sorted(o.frame for o in jobs.outputs(s, f.job(job_id)) if o.worker_id == worker)


def test_a_job_is_sent_back_at_most_twice_then_must_be_approved(farm):  # noqa: F811
    f = farm
    job_id = rendered_job(f, "1-8", ((b"w1", 8, 1.0),))
    for round_, frame in enumerate((1, 2), start=1):
        review.reject_job(f.engine, job_id, f.alice, [frame], f"round {round_}")
        f.render(b"w1", 1, 1.0)
        assert f.job(job_id).status == "rendered"
    with pytest.raises(jobs.JobError) as refused:
        review.reject_job(f.engine, job_id, f.alice, [3], "once more")
    assert refused.value.status == 409
    assert str(refused.value).startswith(f"job {job_id} was sent back for re-rendering 2 times already, the most "
                                         "a job may be: approve the job")
    assert {t.status for t in rows(f.engine, Task, Task.job_id == job_id)} == {"accepted"}, "nothing written"
    review.approve_job(f.engine, job_id, f.alice)
    f.settle()
    assert f.job(job_id).status == "paid"
    assert f.chain.credit(wallet_of("w1")) == f.pricing.cost(8 * 1000), \
        "the 8 kept frames are paid (the 2 rejected renders are not: the bounds keep that loss small)"


def test_a_job_may_have_at_most_half_its_frames_rejected(farm):  # noqa: F811
    f = farm
    job_id = rendered_job(f, "1-4", ((b"w1", 4, 1.0),))
    with pytest.raises(jobs.JobError, match=r"rejecting 3 more tasks would make 3 of job \d+'s 4 rejected, more "
                                            r"than the 50% a job may have"):
        review.reject_job(f.engine, job_id, f.alice, "1-3", "all wrong")
    view = review.reject_job(f.engine, job_id, f.alice, "1-2", "two wrong")
    assert view["requeued_tasks"] == 2
    f.render(b"w1", 2, 1.0)
    with pytest.raises(jobs.JobError, match="would make 3 of job"):
        review.reject_job(f.engine, job_id, f.alice, [3], "and this one")


def test_a_creator_who_rejects_too_much_of_what_they_get_may_not_reject_more(farm, monkeypatch):  # noqa: F811
    f = farm
    monkeypatch.setattr(C, "REJECT_GRACE_FRAMES", 2)
    a = rendered_job(f, "1-4", ((b"w1", 4, 1.0),))
    review.reject_job(f.engine, a, f.alice, "1-2", "not what I wanted")
    f.render(b"w1", 2, 1.0)
    review.approve_job(f.engine, a, f.alice)
    b = rendered_job(f, "1-4", ((b"w2", 4, 1.0),))
    # delivered: 4 + 2 re-renders + 4 = 10, rejected 2; one more is 3 of 10 = 30 % > 25 %
    with pytest.raises(jobs.JobError) as refused:
        review.reject_job(f.engine, b, f.alice, [1], "again")
    assert str(refused.value).startswith("you have rejected 2 of the 10 frames delivered to you; 1 more would be "
                                         "30%, above the 25% a creator may reject: approve the job")
    with new_session(f.engine) as s:
        assert review.standing(s, f.alice.id) == {"frames_delivered": 10, "frames_rejected": 2, "reject_rate": 0.2,
                                                  "max_reject_rate": 0.25, "reject_grace_frames": 2}
    assert [x.outcome for x in rows(f.engine, Attempt, Attempt.job_id == b)].count("rejected") == 0
    with TestClient(create_app(f.engine, f.blobs, ledger=f.ledger)) as http:
        me = http.get("/api/me", headers={"Authorization": f"Bearer {f.alice_token}"}).json()
        assert me["standing"]["reject_rate"] == 0.2 and me["standing"]["frames_rejected"] == 2
        refused = http.post(f"/api/jobs/{b}/reject", json={"frames": "1", "reason": "x"},
                            headers={"Authorization": f"Bearer {f.alice_token}"})
        assert refused.status_code == 409 and "above the 25% a creator may reject" in refused.json()["detail"]
