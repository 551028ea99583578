"""Malicious scenes through a real, sandboxed worker (`farm serve` + `farm worker` processes on loopback).

Each scene is built here with bpy and submitted as an ordinary job. For every one: no file outside the
task folders is created or changed (canary files, and the worker's own folders compared file by file
before and after), no connection reaches a listening socket on loopback, the worker stays online and
keeps its reputation, and the creator's error says what to change. An honest job renders correctly after
them all, on the same worker.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PY, REPO, TEST_SETTINGS, pixels, submit_sample, wait_job, wait_workers

BUILD = REPO / "tests" / "helpers" / "attack_scenes.py"

# scene → (frames, extra job settings, words the creator's error must contain); None: it renders, harmlessly
ATTACKS = {
    "scripts_and_file_outputs": ("1", {}, None),
    "freestyle_script": ("1", {}, ["Freestyle", "Python style modules", "Parameter Editor"]),
    "osl_keyframe": ("1-2", {"chunk": 2}, ["Open Shading Language", "at frame 2"]),
    "osl_driver": ("1-2", {"chunk": 2}, ["Open Shading Language", "at frame 2"]),
    "packed_image_as_sequence": ("1", {}, ["(sequence", "cannot be packed"]),
    "ies_external": ("1", {}, ["IES texture", "switch it to Internal"]),
    "image_reads_key": ("1", {}, ["uses the external file", "Pack Resources"]),
    "udim_external": ("1", {}, ["uses the external file", "Pack Resources"]),
    "volume_external": ("1", {}, ["volume 'Smoke'", "external file"]),
    "sound_external": ("1", {}, ["sound", "external file"]),
    "font_external": ("1", {}, ["font", "external file"]),
    "sequencer_strip": ("1", {}, ["sequencer strip 'plate' uses the external file", "ship it in the project"]),
    "geometry_nodes_import": ("1", {}, ["imports a file by path", "apply"]),
    "linked_library": ("1", {}, ["links data from other .blend files", "Make Local"]),
    "fluid_cache_outside": ("1", {}, ["fluid domain 'Cube'"]),
    "decompression_bomb": ("1", {}, ["decompresses to more than", "Purge Unused Data"]),
    "memory_hog": ("1", {}, ["needs more than", "GiB of memory"]),
    "time_bomb": ("1", {"samples": 65536, "time_limit": 3}, ["ran longer than the job's limit of 3 s"]),
}

WORKER_MEMORY = int(2.5 * 1024**3)  # the sandbox's memory limit for this worker's runtime children


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("attack_scenes")
    host = tmp_path_factory.mktemp("host")           # files of the GPU owner's machine
    secret = host / "worker.key_secret"
    secret.write_text("secret-key = \"TOP-SECRET\"\n")
    os.chmod(secret, 0o600)
    canary = host / "canary"                          # nothing may ever appear in here
    canary.mkdir()
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(d / ".bu"), "XDG_CACHE_HOME": str(d / ".xc")}
    res = subprocess.run([PY, str(BUILD), str(REPO), str(d), str(secret), str(canary)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    missing = [n for n in set(ATTACKS) - {"decompression_bomb"} if not (d / f"{n}.blend").is_file()]
    assert not missing, res.stdout[-3000:]
    for p in canary.iterdir():                        # what building (unsandboxed) wrote: gone before the run
        subprocess.run(["rm", "-rf", str(p)], check=True)
    _decompression_bomb(d / "turntable.blend", d / "decompression_bomb.blend", WORKER_MEMORY)
    return {"dir": d, "secret": secret, "canary": canary}


def _decompression_bomb(src: Path, dst: Path, memory: int) -> None:
    """A small zstd .blend (a real header first) that expands past half the worker's memory."""
    import zstandard
    raw = subprocess.run([PY, "-c", "import sys, zstandard; sys.stdout.buffer.write(zstandard.ZstdDecompressor()"
                          ".stream_reader(open(sys.argv[1], 'rb'), read_across_frames=True).read())", str(src)],
                         capture_output=True, check=True).stdout
    with open(dst, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as z:
        z.write(raw)
        zeros = bytes(16 << 20)
        for _ in range(memory // 2 // len(zeros) + 8):
            z.write(zeros)
    assert dst.stat().st_size < 2 * 1024**2, dst.stat().st_size


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the worker's folder but its runtime children's own and the blob cache: (size, mtime)."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(("runtime/", "work/", "blobs/")) and not rel.endswith(".log"):
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


class Listener:
    """A loopback socket that counts every connection made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.mark.slow
def test_malicious_scenes_touch_nothing_and_are_refused_with_the_fix(farm, worker, scenes, tmp_path,
                                                                     reference_frames):
    listener = Listener()
    (scenes["canary"] / "port").write_text(str(listener.port))  # where the scripts would connect
    f = farm({"RENDERHIVE_CHECK_WAIT": "1"})
    w = worker(f, "gpu-owner", env={"RENDERHIVE_SANDBOX_MEMORY_BYTES": str(WORKER_MEMORY)})
    client = f.admin
    wait_workers(client, 1)
    owner_before = snapshot(w.root)
    secret_before = scenes["secret"].read_bytes()
    canary_before = sorted(p.name for p in scenes["canary"].iterdir())
    rep_before = client.worker_reputation("gpu-owner")

    jobs = {}
    for name, (frames, extra, _words) in ATTACKS.items():
        sha, _ = client.upload_if_missing(scenes["dir"] / f"{name}.blend")
        jobs[name] = client.submit(scene_sha256=sha, frames=frames, **{**TEST_SETTINGS, **extra}, name=name)["id"]
    results = {name: wait_job(client, job, timeout=300) for name, job in jobs.items()}

    problems = []
    for name, (_frames, _extra, words) in ATTACKS.items():
        job = results[name]
        if words is None:
            if job["status"] != "rendered":
                problems.append(f"{name}: {job['status']} {job.get('error')}")
        elif job["status"] != "failed" or not all(wd in (job.get("error") or "") for wd in words):
            problems.append(f"{name}: {job['status']}: {job.get('error')!r} lacks {words}")
    assert not problems, "\n".join(problems)

    # nothing outside the task folders was created, read into an output, or changed
    assert sorted(p.name for p in scenes["canary"].iterdir()) == canary_before == ["port"]
    assert scenes["secret"].read_bytes() == secret_before
    assert snapshot(w.root) == owner_before, "a file of the worker's own changed"
    assert listener.connections == 0
    listener.close()
    # the worker stayed up, and none of it counted against the worker: the scenes were at fault
    workers = {x["id"]: x for x in client.workers()}
    assert workers["gpu-owner"]["online"] and w.alive
    rep_after = client.worker_reputation("gpu-owner")
    bad = [e for e in rep_after["history"] if e["bad"] > 0]
    assert not bad and rep_after["tier"] == rep_before["tier"], bad

    # and it still renders honest work right
    job = submit_sample(client, "1-2")
    assert wait_job(client, job["id"])["status"] == "rendered"
    out = tmp_path / "honest"
    out.mkdir()
    client.approve(job["id"])
    for o in client.outputs(job["id"]):
        client.download_output(job["id"], o["name"], out / o["name"])
    for frame in (1, 2):
        assert np.array_equal(pixels(out / f"frame_{frame:04d}.png"), pixels(reference_frames[frame]))


@pytest.mark.slow
def test_the_fluid_scene_does_write_outside_when_opened_unconfined(scenes):
    """Positive control of the canary check above: opened by plain bpy (no sandbox, no checks), the fluid
    scene writes its cache into the canary folder while loading. In the sandboxed worker it did not."""
    cache = scenes["canary"] / "fluid_cache"
    assert not cache.exists()
    code = ("import bpy, os, sys; bpy.ops.wm.open_mainfile(filepath=sys.argv[1], load_ui=False, use_scripts=False); "
            "os._exit(0)")
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(scenes["dir"] / ".bu2"),
           "XDG_CACHE_HOME": str(scenes["dir"] / ".xc2")}
    subprocess.run([PY, "-c", code, str(scenes["dir"] / "fluid_cache_outside.blend")], env=env,
                   capture_output=True, timeout=120)
    try:
        assert cache.exists() and any(cache.rglob("*")), "the control wrote nothing: the canary check proves nothing"
    finally:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
