"""The probe render of a new scene (issue 23, part 1; farm.kinds.probe) through a real ``Coordinator.step`` on
a real SQLite file: the job starts probing and only its probe is leased, ahead of other work; its result
is measured (coordinator time split by the reported render seconds, the render scaled by pixels ×
samples), discarded (no output row), the quote re-made at the locked rate, and the job goes on — to
``funding`` when it waits for a deposit; the probe is paid from the job like a check; a failing probe
fails the job with the worker's words, but only once a stranger's "not retryable" was tried elsewhere.
(The end-to-end run with real sandboxed workers and the estimate's bound is tests/e2e/test_probe.py.)"""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from common import protocol as P
from farm.core.coordinator import Coordinator
from farm.core.scheduler import Scheduler
from farm.kinds import probe
from farm.kinds.jobs import job_view
from farm.kinds.registry import create_job
from farm.payments import pricing as pr
from farm.payments import quotes
from farm.payments.market import Market, MarketTerms
from farm.store.db import session as new_session
from farm.store.models import Event, Job, Output, Task
from farm.web.app import create_app
from tests.fixtures_inproc import Driver, make_engine_and_store, make_user, of, output_blob, put_scene

PRICING = pr.Pricing()
FRAME = {"resolution_percent": 40, "samples": 16}  # the probe: 20 %, 4 samples: 1/16 of the pixel-samples


def submit(engine, blobs, user, frames="1-4", scene=None, hold=False, **extra) -> tuple[int, bool]:
    """What POST /api/jobs does (farm.web.api_jobs.create_quoted) on a farm that probes."""
    req = {"scene_sha256": scene or put_scene(blobs), "frames": frames, **FRAME, **extra}
    with new_session(engine) as s:
        offer = quotes.offer(Market(MarketTerms(), None), quotes.TierTerms(), req)
        job = create_job("blender", s, user, blobs, req, hold)
        probing = probe.wanted(s, job) and probe.start(s, job) is not None
        s.flush()
        quotes.lock(s, PRICING, job, offer, None, probing=probing)
        s.commit()
        return job.id, probing


def page(engine, blobs, token, job_id) -> str:
    """The job page as its creator sees it (signed in through the login form)."""
    with TestClient(create_app(engine, blobs)) as http:
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text).group(1)
        assert http.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False).status_code == 303
        return http.get(f"/jobs/{job_id}").text


def job_of(engine, job_id):
    with new_session(engine) as s:
        job = s.get(Job, job_id)
        return job, job_view(s, job, detail=True)


@pytest.fixture
def farm(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, token = make_user(engine, "alice")
    d = Driver(Coordinator(engine, blobs, Scheduler(seed=0), verify=False,
                           quoting=quotes.ProbeQuotes(PRICING)))
    d.token = token
    return engine, blobs, alice, d


def test_a_new_scene_is_probed_first_measured_discarded_quoted_and_paid_like_a_check(farm):
    engine, blobs, alice, d = farm
    other, _ = submit(engine, blobs, alice, "1-3", priority=5)  # another scene, urgent: probed too
    job_id, probing = submit(engine, blobs, alice, "1-4", hold=True)
    assert probing
    job, view = job_of(engine, job_id)
    assert job.status == "probing" and view["tasks"] == {"total": 4, "queued": 4}, "the probe is not its task"
    assert view["probe"]["state"] == "probing" and view["spec"]["quote"]["probing"] is True
    guess = view["spec"]["quote"]
    assert 'id="probing"' in page(engine, blobs, d.token, job_id)
    with new_session(engine) as s:
        assert s.exec(select(Event.new).where(Event.job_id == job_id).where(Event.kind == "job")).all() == ["probing"]

    d.hello(b"w1", 2)
    tasks = of(d.send((b"w1", P.Ready(2))), P.Task, b"w1")
    assert len(tasks) == 2 and {t.job_id for t in tasks} == {other, job_id}, "only the two probes are leased"
    t = next(t for t in tasks if t.job_id == job_id)
    assert t.spec["frames"] == [1] and t.spec["settings"]["resolution_percent"] == 20
    assert t.spec["settings"]["samples"] == 4 and t.spec["outputs"] == ["frame_0001.png"]
    assert not {"probe", "check_id"} & set(t.spec), "the worker is not told it renders a probe"
    # 2 s of the coordinator's clock, 0.5 s of it rendering: 1.5 s fixed + 0.5 s × 16 = 9.5 s a frame
    out = output_blob(blobs, 1, "probe")
    d.send((b"w1", P.Result(t.task_id, t.attempt, [out], 0.5)), dt=2.0)
    job, view = job_of(engine, job_id)
    assert job.status == "funding", "probed, then it waits for its deposit: no task leased before"
    assert view["probe"]["seconds"] == 2.0 and view["probe"]["seconds_per_unit"] == pytest.approx(9.5)
    quote = view["spec"]["quote"]
    assert quote["probing"] is False and quote["basis"].startswith("probe render")
    assert quote["rate"] == guess["rate"], "the rate locked at submit stays"
    assert int(quote["cost"]) == PRICING.cost(4 * 9500, int(quote["rate"]))
    assert quote["cost"] != guess["cost"] and quote["guess"]["cost_tokens"] == guess["cost_tokens"]
    assert int(quote["probe_cost"]) == PRICING.cost(round(9.5 * 0.0625 * 1000), int(quote["rate"]))
    with new_session(engine) as s:
        ptask = s.get(Task, t.task_id)
        assert ptask.probe and ptask.status == "canceled"
        assert not s.exec(select(Output).where(Output.job_id == job_id)).all(), "its output is discarded"
    html = page(engine, blobs, d.token, job_id)
    assert 'id="probed"' in html and quote["deposit_tokens"] in html and quote["probe_cost_tokens"] in html

    # funded: the job's own four frames, each 1 s of the coordinator's clock; the probe is paid as a check
    with new_session(engine) as s:
        from farm.store.states import JobStatus, transition
        transition(s, s.get(Job, job_id), JobStatus.queued, reason="deposit confirmed (test)")
        s.commit()
    d.coord.request_assignment()
    done = 0
    while done < 4:
        for t in of(d.send((b"w1", P.Ready(1)), dt=0.0), P.Task, b"w1"):
            if t.job_id != job_id:
                continue
            outs = [output_blob(blobs, f, f"{t.task_id}") for f in t.spec["frames"]]
            d.send((b"w1", P.Result(t.task_id, t.attempt, outs, 0.9)), dt=1.0)
            done += 1
    job, view = job_of(engine, job_id)
    assert job.status == "rendered" and view["tasks"] == {"total": 4, "accepted": 4}
    with new_session(engine) as s:
        shares, _ = pr.shares(s, PRICING, job_id, 10**30)
        ref = pr.reference_work(s, job_id)
    (w1,) = shares
    assert w1.checks == 1 and w1.check_ms == round(ref * 0.0625 * 1000), "the probe: a sixteenth of a unit"
    assert w1.work_ms == round(4 * ref * 1000)

    # history now: a second job of the scene and settings is not probed
    scene = job.spec["scene_sha256"]
    again, probing = submit(engine, blobs, alice, "5-6", scene=scene)
    assert not probing and job_of(engine, again)[0].status == "queued"
    # nor is a tiled one (its tasks' settings add the tile): quoted per tile, a quarter of the frames' 0.9 s
    tiled, probing = submit(engine, blobs, alice, "7-8", scene=scene, tiles="2x2")
    quote = job_of(engine, tiled)[1]["spec"]["quote"]
    assert not probing and quote["units"] == 8 and quote["seconds_per_unit"] == pytest.approx(0.9 / 4)
    assert quote["basis"] == "median of 4 earlier tasks of this scene and settings"


def test_a_failing_probe_fails_the_job_with_the_workers_words_once_a_second_worker_agrees(farm):
    engine, blobs, alice, d = farm
    job_id, _ = submit(engine, blobs, alice, "1-4")
    d.hello(b"w1")
    d.hello(b"w2")
    (t,) = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    d.send((b"w1", P.Failed(t.task_id, t.attempt, "scene uses a missing texture", False)), dt=1)
    assert job_of(engine, job_id)[0].status == "probing", "a new worker's 'not retryable' is tried elsewhere"
    (t2,) = of(d.send((b"w2", P.Ready(1))), P.Task, b"w2")
    assert t2.task_id == t.task_id
    d.send((b"w2", P.Failed(t2.task_id, t2.attempt, "scene uses a missing texture", False)), dt=1)
    job, view = job_of(engine, job_id)
    assert job.status == "failed" and "the probe render failed: scene uses a missing texture" in job.error
    assert view["tasks"] == {"total": 4, "canceled": 4}, "nothing of it runs, nothing is deposited"
    assert not of(d.send((b"w1", P.Ready(1))), P.Task)


def test_a_canceled_probing_job_leases_nothing(farm):
    engine, blobs, alice, d = farm
    job_id, _ = submit(engine, blobs, alice, "1-2")
    d.coord.cancel_job(job_id, alice)
    d.hello(b"w1")
    assert not of(d.send((b"w1", P.Ready(1))), P.Task)
    assert job_of(engine, job_id)[0].status == "canceled"


def test_the_measure_scales_the_render_by_pixels_times_samples_and_bounds_a_liar():
    assert probe.reduced({"resolution_percent": 50, "samples": 16, "passes": ["depth"], "tile": {"cols": 2}}) == (
        {"resolution_percent": 25, "samples": 4}, pytest.approx(1 / 16))
    assert probe.reduced({"resolution": [640, 480], "resolution_percent": 100, "samples": 3})[0] == {
        "resolution": [320, 240], "resolution_percent": 100, "samples": 1}
    assert probe.reduced({"format": "PNG"}) == ({"format": "PNG"}, 1.0), "what the scene decides is kept"
    p = {"fraction": 0.0625, "tiles": 4}
    assert probe.per_unit(p, 2.0, 0.5) == (pytest.approx(9.5 / 4), pytest.approx(9.5))
    assert probe.per_unit(p, 2.0, 0.0)[1] == 2.0, "a worker claiming no render time: the coordinator's time"
    assert probe.per_unit(p, 2.0, 99.0)[1] == pytest.approx(32.0), "a claim is capped by the coordinator's time"


def test_tiled_history_counts_for_the_scene_per_frame_and_per_tile(farm):
    """A scene rendered only tiled (its tasks' settings carry the tile; a video job's, the stamped frame
    rate) has history: a later job of it, tiled or not, is not probed and is estimated from those tiles."""
    engine, blobs, alice, d = farm
    scene = put_scene(blobs)
    first, probing = submit(engine, blobs, alice, "1-2", scene=scene, tiles="2x2", video=True)
    assert probing
    with new_session(engine) as s:  # its eight tiles accepted, 0.3 s each: 1.2 s a frame
        tiles = s.exec(select(Task).where(Task.job_id == first).where(Task.kind == "render")
                       .where(Task.probe.is_(False))).all()
        assert len(tiles) == 8 and all(t.spec["settings"]["tile"] and t.spec["settings"]["stamp_fps"] for t in tiles)
        for t in tiles:
            t.status, t.render_seconds = "accepted", 0.3
            s.add(t)
        s.commit()
    plain, probing = submit(engine, blobs, alice, "3-5", scene=scene)
    quote = job_of(engine, plain)[1]["spec"]["quote"]
    assert not probing and quote["units"] == 3 and quote["seconds_per_unit"] == pytest.approx(1.2)
    tiled, probing = submit(engine, blobs, alice, "6", scene=scene, tiles="3x2")
    quote = job_of(engine, tiled)[1]["spec"]["quote"]
    assert not probing and quote["units"] == 6 and quote["seconds_per_unit"] == pytest.approx(0.2)
    with new_session(engine) as s:  # other settings are not this history
        other = pr.seconds_per_unit(s, PRICING, scene, {**job_of(engine, plain)[0].spec["settings"], "samples": 64})
    assert other == (pytest.approx(1.2), "median of the farm's last 8 accepted tasks")
