"""Verification end to end: real `farm serve`, real workers rendering the sample scene with bpy (and the
tiny diffusion pipeline), real cheating workers (tests/helpers/cheater.py: the real daemon whose outputs
are tampered with). Three honest workers and one cheater per cheating mode, several jobs each."""
from __future__ import annotations

import pytest

from tests.conftest import SAMPLE, TEST_SETTINGS, pixels, submit_sample, wait_for, wait_job, wait_workers

MODES = ["black", "noise", "copy", "stale", "fewer_samples", "painted"]


def outputs_match(client, job_id: int, reference: dict[int, "object"], tmp_path) -> list[int]:
    """Frames of the job whose pixels differ from the reference render (approving first releases them)."""
    client.approve(job_id)
    wrong = []
    for o in client.outputs(job_id):
        path = client.download_output(job_id, o["name"], tmp_path / f"j{job_id}_{o['name']}")
        if not (pixels(path) == pixels(reference[o["frame"]])).all():
            wrong.append(o["frame"])
    return wrong


@pytest.mark.slow
def test_three_honest_workers_and_one_cheater_per_mode(farm, worker, tmp_path, reference_frames):
    f = farm({"RENDERHIVE_CHECK_WAIT": "60"})
    alice = f.creator("alice")
    # one lease a slot, as before pipelined leases: prefetching honest workers hold two tasks each, and a
    # new cheater (weighted low, explored at 10 %) then often touched none of its 18 chances
    honest = [worker(f, f"h{i}", env={"RENDERHIVE_PREFETCH": "0"}) for i in (1, 2, 3)]
    wait_workers(alice, 3)
    # the honest workers earn their standing first (each checks the others' first results)
    warm = submit_sample(alice, "1-9", **TEST_SETTINGS)
    assert wait_job(alice, warm["id"])["status"] == "rendered"
    summary = {}
    for mode in MODES:
        cheat = worker(f, f"cheat-{mode}", cheat=mode)
        wait_for(lambda: any(w["id"] == f"cheat-{mode}" and w["online"] for w in alice.workers()), 60,
                 what=f"the {mode} cheater online")
        jobs = [submit_sample(alice, "1-6", **TEST_SETTINGS) for _ in range(3)]
        for j in jobs:
            assert wait_job(alice, j["id"], timeout=240)["status"] == "rendered", (mode, j)
        cheat.stop()
        views = [alice.job(j["id"]) for j in jobs]
        checks = [c for v in views for c in v["checks"]]
        touched = {v["id"] for v in views for c in v["checks"] if c["worker_id"] == f"cheat-{mode}"}
        caught = {v["id"] for v in views for c in v["checks"]
                  if c["worker_id"] == f"cheat-{mode}" and c["status"] == "failed"}
        me = next(w for w in alice.workers() if w["id"] == f"cheat-{mode}")
        summary[mode] = (len(touched), len(caught), me["tasks_done"], me["tier"])
        # caught in every job it handed a wrong result in: a job it touched but was not caught in got only
        # passed checks from it (a copy of the first frame it rendered IS that frame), and the pixels of
        # every final output are compared with the reference below
        for jid in touched - caught:
            mine = [c for v in views if v["id"] == jid for c in v["checks"] if c["worker_id"] == f"cheat-{mode}"]
            assert all(c["status"] == "passed" for c in mine), (mode, jid, mine)
        assert me["tier"] == "probation" or not touched, (mode, me, alice.worker_reputation(me["id"]))
        for v in views:  # every final output is the honest render
            assert not outputs_match(alice, v["id"], reference_frames, tmp_path), (mode, v["id"])
        assert all(c["status"] in ("passed", "disputed", "unverified", "canceled")  # disputed: settled by a third
                   for c in checks if c["worker_id"] != f"cheat-{mode}"), f"{mode}: an honest worker was flagged"
    workers = {w["id"]: w for w in alice.workers()}
    for h in ("h1", "h2", "h3"):
        assert workers[h]["checks_failed"] == 0 and workers[h]["tier"] in ("trusted", "top"), workers[h]
    # every cheater was caught: the modes that touched a job got no more job work after their verdict
    caught_modes = [m for m, (t, c, _, _) in summary.items() if t]
    assert len(caught_modes) >= 5, summary
    print("\ncheaters (jobs touched, jobs caught in, tasks it was credited, tier):", summary)
    for w in honest:
        assert w.alive


@pytest.mark.slow
def test_tiles_are_checked_whole_and_pass(farm, worker, reference_frames, tmp_path):
    f = farm()
    alice = f.creator("alice")
    worker(f, "w1")
    worker(f, "w2")
    wait_workers(alice, 2)
    job = submit_sample(alice, "2", tiles="2x2", **TEST_SETTINGS)
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered"
    view = alice.job(job["id"])
    tile_checks = [c for c in view["checks"] if c["output"].startswith("tile_")]
    assert tile_checks and all(c["status"] == "passed" and c["mode"] == "full" for c in tile_checks)
    assert not outputs_match(alice, job["id"], reference_frames, tmp_path)


@pytest.mark.slow
def test_diffusion_images_are_checked_by_regenerating_the_seed(farm, worker, tmp_path):
    from tests.kinds.test_diffusion import SD_ENV, SIZE
    from worker.runtimes.tiny_pipeline import build
    model = build(tmp_path / "models" / "tiny-sd")
    f = farm()
    alice = f.creator("alice")
    worker(f, "w1", env=SD_ENV, models=[model.parent])
    worker(f, "w2", env=SD_ENV, models=[model.parent])
    wait_workers(alice, 2)
    job = alice.submit_diffusion(model="tiny-sd", prompts=["a lighthouse"], count=4, seed=7, steps=4,
                                 width=SIZE, height=SIZE)
    assert wait_job(alice, job["id"], timeout=240)["status"] == "rendered"
    view = alice.job(job["id"])
    checks = [c for c in view["checks"] if c["output"].startswith("image_")]
    assert checks and all(c["status"] == "passed" for c in checks), checks
    assert all(c.get("exact") for c in checks), "two CPU workers regenerate the seed bit for bit"
    assert SAMPLE.exists()
