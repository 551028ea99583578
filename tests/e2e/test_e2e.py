"""End to end with real processes: `farm serve`, `farm worker` daemons with Blender children, real renders.

Every rendered frame is compared pixel for pixel with a direct bpy render of the same frame and settings.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from client.api import ApiError
from farm.store.db import make_engine
from farm.store.models import Job
from tests.conftest import (
    PY,
    REPO,
    SAMPLE,
    TEST_SETTINGS,
    direct_render,
    pixels,
    submit_sample,
    wait_for,
    wait_job,
    wait_workers,
)
from tests.fixtures_inproc import rows

pytestmark = pytest.mark.slow


def assert_frames_match(client, job_id, frames, reference, out_dir):
    client.approve(job_id)  # full-resolution files are released on approval
    paths = client.download_results(job_id, out_dir)
    outs = client.outputs(job_id)
    assert sorted(o["frame"] for o in outs) == sorted(frames), "each frame exactly once"
    assert len({o["name"] for o in outs}) == len(frames)
    for p in paths:
        frame = int(p.stem.split("_")[1])
        got, want = pixels(p), pixels(reference[frame])
        assert got.shape == (48, 64, 4)
        assert np.array_equal(got, want), f"frame {frame} differs from the direct bpy render"
    return outs


def test_two_workers_render_identical_to_direct_bpy(farm, worker, reference_frames, tmp_path):
    f = farm()
    worker(f, "w1")
    worker(f, "w2")
    alice = f.creator("alice")
    wait_workers(alice, 2)
    job = submit_sample(alice, "1-8")
    assert job["tasks"]["total"] == 8 and job["status"] == "funding", "payments on: leased once the deposit is in"
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    outs = assert_frames_match(alice, job["id"], range(1, 9), reference_frames, tmp_path / "out")
    assert {o["worker_id"] for o in outs} == {"w1", "w2"}, "both workers took part"
    # frames differ from each other (the turntable turns)
    assert not np.array_equal(pixels(reference_frames[1]), pixels(reference_frames[2]))

    # the same scene again: nothing is uploaded, and it renders from the workers' caches
    sha, sent = alice.upload_if_missing(SAMPLE)
    assert sent == 0
    again = alice.submit(scene_sha256=sha, frames="3-4", **TEST_SETTINGS)
    assert wait_job(alice, again["id"])["status"] == "rendered"
    workers = {w["id"]: w for w in alice.workers()}
    assert workers["w1"]["tasks_done"] + workers["w2"]["tasks_done"] == 10


def _running_on(client, job_id, worker_id):
    job = client.job(job_id)
    return any(t["status"] == "running" and t["worker_id"] == worker_id for t in job["task_list"])


def test_worker_killed_mid_render_task_is_released(farm, worker, reference_frames, tmp_path):
    f = farm()
    w1 = worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = submit_sample(alice, "1-8", chunk=4)  # two tasks of four frames
    wait_for(lambda: _running_on(alice, job["id"], "w1"), 60, interval=0.05, what="w1 rendering")
    w1.kill()  # kill -9 the daemon and its Blender child mid-task
    worker(f, "w2")
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    assert_frames_match(alice, job["id"], range(1, 9), reference_frames, tmp_path / "out")
    detail = alice.job(job["id"])
    assert max(t["attempt"] for t in detail["task_list"]) >= 2, "a task was re-leased"
    assert any("lease lost" in e["detail"] for e in detail["events"])


def test_coordinator_killed_mid_job_resumes_on_same_db(farm, worker, reference_frames, tmp_path, db_url):
    f = farm(db=db_url.replace("postgresql+psycopg://", "postgresql://"))  # SQLite file or PostgreSQL
    worker(f, "w1")
    worker(f, "w2")
    alice = f.creator("alice")
    wait_workers(alice, 2)
    job = submit_sample(alice, "1-8", chunk=2)
    wait_for(lambda: alice.job(job["id"])["frames_done"] >= 1, 60, interval=0.05, what="first frames")
    f.kill()  # kill -9 the coordinator mid-job
    assert not f.alive
    f.start()  # same data dir, same ports
    done = wait_job(alice, job["id"], timeout=240)
    assert done["status"] == "rendered", done
    assert_frames_match(alice, job["id"], range(1, 9), reference_frames, tmp_path / "out")
    engine = make_engine(db_url, upgrade=False)  # the farm kept its state in the database it was given
    assert [j.id for j in rows(engine, Job)] == [job["id"]]
    engine.dispose()


def test_malicious_scene_runs_no_code(farm, worker, tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "malicious.blend"
    subprocess.run([PY, str(REPO / "sample_scenes" / "build_samples.py"), "--malicious", str(marker),
                    "--out-file", str(evil)], check=True, capture_output=True, timeout=300,
                   env={"BLENDER_USER_RESOURCES": str(tmp_path / "bu"), "XDG_CACHE_HOME": str(tmp_path / "xc"),
                        "PATH": "/usr/bin:/bin"})
    assert evil.exists() and not marker.exists()
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    job = submit_sample(alice, "1-2", scene=evil)
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    assert len(alice.outputs(job["id"])) == 2
    assert not marker.exists(), "a script in the scene ran on the worker"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("pwned")]
    assert leftovers == [], f"the scene wrote files outside its output folder: {leftovers}"


def test_corrupt_scene_fails_job_with_reason_and_worker_survives(farm, worker, tmp_path):
    f = farm()
    w1 = worker(f, "w1")
    alice = f.creator("alice")
    # not a .blend at all: refused at submit, nothing queued
    junk = tmp_path / "junk.blend"
    junk.write_bytes(b"this is not a blend file" * 100)
    with pytest.raises(ApiError, match="not a .blend file") as err:
        submit_sample(alice, "1", scene=junk)
    assert err.value.status == 400
    assert alice.jobs() == []
    # a truncated .blend passes the header check but cannot be opened
    broken = tmp_path / "broken.blend"
    broken.write_bytes(SAMPLE.read_bytes()[:5000])
    job = submit_sample(alice, "1-3", scene=broken)
    done = wait_job(alice, job["id"])
    assert done["status"] == "failed"
    assert "open" in done["error"].lower() or "blend" in done["error"].lower(), done["error"]
    assert w1.alive
    # the same worker still renders a good scene
    good = submit_sample(alice, "1")
    assert wait_job(alice, good["id"])["status"] == "rendered"


def test_cancel_revokes_running_work(farm, worker, tmp_path):
    f = farm()
    w1 = worker(f, "w1")
    alice = f.creator("alice")
    job = submit_sample(alice, "1-24", chunk=12)
    wait_for(lambda: _running_on(alice, job["id"], "w1"), 60, interval=0.05, what="w1 rendering")
    view = alice.cancel(job["id"])
    assert view["status"] == "canceled"
    assert alice.cancel(job["id"])["status"] == "canceled"  # idempotent
    # the worker drops the task and takes new work right away
    nxt = submit_sample(alice, "1")
    assert wait_job(alice, nxt["id"], timeout=60)["status"] == "rendered"
    assert w1.alive
    assert len(alice.outputs(job["id"])) < 24


def test_png16_and_exr_outputs(farm, worker, tmp_path):
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    png16 = submit_sample(alice, "1", color_depth="16")
    exr = submit_sample(alice, "1", format="EXR")
    for job in (png16, exr):
        assert wait_job(alice, job["id"])["status"] == "rendered"
        alice.approve(job["id"])
    p16 = alice.download_results(png16["id"], tmp_path / "p16")[0]
    e = alice.download_results(exr["id"], tmp_path / "exr")[0]
    ref = direct_render(SAMPLE, tmp_path / "ref16", [1], color_depth="16", **TEST_SETTINGS)[1]
    assert p16.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p16.read_bytes()[24] == 16  # IHDR bit depth
    assert e.name.endswith(".exr") and e.read_bytes()[:4] == b"\x76\x2f\x31\x01"
    import zlib
    def idat(path):  # 16-bit pixels: compare decompressed image data (PNG metadata has dates)
        data, pos, out = path.read_bytes(), 8, b""
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4:pos + 8] == b"IDAT":
                out += data[pos + 8:pos + 8 + n]
            pos += 12 + n
        return zlib.decompress(out)
    assert idat(p16) == idat(ref)
    shutil.rmtree(tmp_path / "ref16", ignore_errors=True)


def test_garbage_on_the_worker_plane_leaves_the_coordinator_serving(farm):
    import zmq

    from common import protocol as P
    from common.keys import read_public_key
    f = farm()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.curve_serverkey = read_public_key(str(f.server_key_file))  # an admitted key (open on loopback)
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(f.endpoint)
    try:
        for frames in ([b"hello"], [b"RHIVE/1", b"\x01", b"\xc1\xc1"], [b"RHIVE/9", b"\x01", b"{}"],
                       [b"RHIVE/1", b"\x05", b"\x80"], [b"\x00" * 100_000]):
            sock.send_multipart(frames)
        replies = [P.decode(sock.recv_multipart()) for _ in range(5)]
        assert all(isinstance(r, P.Error) for r in replies), replies
        # a RESULT from a connection that never said HELLO: told to reconnect, nothing stored
        sock.send_multipart(P.encode(P.Result(1, 1, [], 0.0)))
        assert isinstance(P.decode(sock.recv_multipart()), P.Disconnect)
        sock.send_multipart(P.encode(P.Hello("probe", "", 1, {"runtimes": []})))
        assert isinstance(P.decode(sock.recv_multipart()), P.Welcome)
    finally:
        sock.close(0)
    assert f.alive and f.admin.health()["ok"]


def test_runtime_over_memory_ceiling_is_recycled_between_tasks(farm, worker, reference_frames, tmp_path):
    f = farm()
    w1 = worker(f, "w1", env={"RENDERHIVE_RUNTIME_MAX_RSS_BYTES": "1"})  # every child is "too big"
    alice = f.creator("alice")
    job = submit_sample(alice, "1-3")
    assert wait_job(alice, job["id"])["status"] == "rendered"
    assert_frames_match(alice, job["id"], range(1, 4), reference_frames, tmp_path / "out")
    assert w1.log.read_text().count("over the ceiling: restarting it") == 3
