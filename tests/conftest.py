"""Shared fixtures: real coordinator and worker processes on loopback, and reference renders.

`farm` and `worker` are factories (arq style): everything they start is killed at the end of the test.
Processes run `python -m client.cli …` from this venv, log to files in the test's tmp dir (printed when a
test fails), and Blender children get their own BLENDER_USER_RESOURCES / XDG_CACHE_HOME.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError, Client

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SAMPLE = REPO / "sample_scenes" / "turntable.blend"
TEST_SETTINGS = {"resolution_percent": 20, "samples": 4}  # 64x48, 4 samples: well under a second a frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RENDERHIVE_LOG": "INFO", **(extra or {})}
    env.pop("RENDERHIVE_URL", None)
    env.pop("RENDERHIVE_TOKEN", None)
    return env


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.args, self.log, self.env = args, log, env
        self.p: subprocess.Popen | None = None

    def start(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.log, "ab")
        self.p = subprocess.Popen([PY, "-m", "client.cli", *self.args], cwd=REPO, env=self.env, stdout=f,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        f.close()
        return self

    @property
    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL, wait: bool = True):
        """Signal the whole process group (the worker's Blender children too, as a crash would)."""
        if self.alive:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            if wait:
                try:
                    self.p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.p.pid, signal.SIGKILL)
                    self.p.wait(10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Farm(Proc):
    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.data = root / "data"
        self.zport, self.hport = free_port(), free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.zport}"
        self.url = f"http://127.0.0.1:{self.hport}"
        super().__init__(["serve", "--data", str(self.data), "--bind", self.endpoint,
                          "--http", f"127.0.0.1:{self.hport}"], root / "serve.log", env)

    def start(self):
        super().start()

        def up():
            if not self.alive:
                raise AssertionError(f"farm serve exited:\n{self.tail()}")
            try:
                return Client(self.url, "", timeout=2).health()
            except ApiError:
                return None
        wait_for(up, 30, what="farm serve to answer /api/health")
        return self

    @property
    def admin(self) -> Client:
        return Client(self.url, (self.data / "admin.token").read_text().strip())

    def creator(self, name: str) -> Client:
        return Client(self.url, self.admin.create_user(name)["token"])


class Worker(Proc):
    def __init__(self, root: Path, farm: Farm, worker_id: str, env: dict[str, str], slots: int = 1):
        self.root, self.worker_id = root, worker_id
        super().__init__(["worker", "--coordinator", farm.endpoint, "--cache", str(root), "--slots", str(slots),
                          "--worker-id", worker_id, "--gpus", "none"], root / "worker.log", env)


@pytest.fixture
def procs(request):
    started: list[Proc] = []
    yield started
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for p in reversed(started):
        if failed:
            print(f"\n----- {p.log} -----\n{p.tail(60)}")
        p.kill(signal.SIGTERM if p.alive else signal.SIGKILL)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def farm(tmp_path, procs):
    """Factory: ``farm(env=None)`` starts `farm serve` on free loopback ports in tmp_path."""
    def make(env: dict[str, str] | None = None, root: Path | None = None) -> Farm:
        f = Farm(root or tmp_path / f"farm{len(procs)}", _env(env))
        procs.append(f)
        return f.start()
    return make


@pytest.fixture
def worker(tmp_path, procs):
    """Factory: ``worker(farm, "w1")`` starts `farm worker` with its own cache dir, connected to farm."""
    def make(f: Farm, worker_id: str, env: dict[str, str] | None = None, slots: int = 1) -> Worker:
        w = Worker(tmp_path / worker_id, f, worker_id, _env(env), slots)
        procs.append(w)
        return w.start()
    return make


def wait_workers(client: Client, n: int, timeout: float = 60):
    return wait_for(lambda: len([w for w in client.workers() if w["online"]]) >= n, timeout,
                    what=f"{n} workers online")


def wait_job(client: Client, job_id: int, statuses=("rendered", "failed", "canceled"), timeout: float = 180):
    return wait_for(lambda: (lambda j: j if j["status"] in statuses else None)(client.job(job_id)), timeout,
                    interval=0.25, what=f"job {job_id} to reach {statuses}")


def submit_sample(client: Client, frames: str, scene: Path = SAMPLE, **settings) -> dict:
    sha, _ = client.upload_if_missing(scene)
    return client.submit(scene_sha256=sha, frames=frames, **{**TEST_SETTINGS, **settings})


# ------------------------------------------------------------------ reference renders
def direct_render(scene: Path, out_dir: Path, frames: list[int], **settings) -> dict[int, Path]:
    """Render frames with plain bpy in a fresh process (tests/helpers/direct_render.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [PY, str(REPO / "tests" / "helpers" / "direct_render.py"), str(scene), str(out_dir),
            "--frames", ",".join(map(str, frames))]
    for key, val in settings.items():
        if val is not None:
            args += [f"--{key.replace('_', '-')}", str(val)]
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(out_dir / ".bu"), "XDG_CACHE_HOME": str(out_dir / ".xc")}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return {o["frame"]: Path(o["path"]) for o in json.loads(res.stdout.strip().splitlines()[-1])["outputs"]}


@pytest.fixture(scope="session")
def reference_frames(tmp_path_factory):
    """Direct bpy renders of sample frames 1-8 at the test settings, rendered once per session."""
    return direct_render(SAMPLE, tmp_path_factory.mktemp("reference"), list(range(1, 9)), **TEST_SETTINGS)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)
