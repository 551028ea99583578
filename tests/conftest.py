"""Shared fixtures: real coordinator and worker processes on loopback, and reference renders.

`farm` and `worker` are factories (arq style) over :mod:`client.localfarm`: everything they start is
stopped at the end of the test, and its log is printed when the test failed.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import localfarm
from client.api import Client
from tests import pg

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SAMPLE = REPO / "sample_scenes" / "turntable.blend"
TEST_SETTINGS = {"resolution_percent": 20, "samples": 4}  # 64x48, 4 samples: well under a second a frame


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    try:
        return localfarm.wait_for(predicate, timeout, interval, what)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


TEST_ENV = {"RENDERHIVE_LOG": "INFO",
            # no probe renders of new scenes (farm.kinds.probe) unless a test asks: each test's farm is new to
            # every scene, and the tests written before the probe count their jobs' leases and events
            "RENDERHIVE_PROBE": "off",
            # workers must not find (and hash) the developer's own hub models; nothing is ever downloaded
            "HF_HUB_CACHE": str(REPO / ".no-hub-cache-in-tests"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def procs(request):
    started: list[localfarm.Proc] = []
    yield started
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for p in reversed(started):
        if failed:
            print(f"\n----- {p.log} -----\n{p.tail(60)}")
        p.stop()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def farm(tmp_path, procs):
    """Factory: ``farm(env=None, db=None)`` starts `farm serve` on free loopback ports in tmp_path (``db``:
    its ``--db`` URL, e.g. the ``db_url`` fixture's)."""
    def make(env: dict[str, str] | None = None, db: str | None = None) -> localfarm.Coordinator:
        f = localfarm.Coordinator(tmp_path / f"farm{len(procs)}", localfarm.process_env({**TEST_ENV, **(env or {})}),
                                  db=db)
        procs.append(f)
        return f.start()
    return make


@pytest.fixture
def worker(tmp_path, procs):
    """Factory: ``worker(farm, "w1")`` starts `farm worker` with its own cache dir, connected to farm;
    ``models``: diffusion model folders it holds (``farm worker --models``); ``args``: more options
    (e.g. ``["--no-benchmark"]``); ``cheat``: a mode of tests/helpers/cheater.py, which starts a worker
    that tampers with its renders that way instead."""
    def make(f: localfarm.Coordinator, worker_id: str, env: dict[str, str] | None = None,
             slots: int = 1, models: list[Path] | None = None, args: list[str] | None = None,
             cheat: str | None = None) -> localfarm.WorkerProc:
        w = localfarm.WorkerProc(tmp_path / worker_id, f, worker_id,
                                 localfarm.process_env({**TEST_ENV, **(env or {})}), slots, gpus="none",
                                 models=models, extra_args=args,
                                 **({"module": "tests.helpers.cheater", "argv_prefix": ["--mode", cheat]}
                                    if cheat else {}))
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


# ------------------------------------------------------------------ databases: SQLite and PostgreSQL
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (tests/pg.py), started on first use. Missing or broken, it fails
    the tests that need it, saying how to install it: never a skip."""
    try:
        server = pg.start_server()
    except pg.PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def new_db_url(request, backend: str, directory: Path) -> str:
    """A fresh, empty database of ``backend``: a SQLite file in ``directory``, or a new PostgreSQL database
    (dropped when ``request``'s scope ends)."""
    if backend == "sqlite":
        directory.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{directory / 'farm.db'}"
    server = request.getfixturevalue("postgres")
    name = server.create_database()
    request.addfinalizer(lambda: server.drop_database(name))
    return server.url(name)


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """The URL of a fresh, empty database, once on SQLite and once on PostgreSQL."""
    return new_db_url(request, request.param, tmp_path / "db")


# ------------------------------------------------------------------ reference renders
def direct_render(scene: Path, out_dir: Path, frames: list[int], **settings) -> dict[int, Path]:
    """Render frames with plain bpy in a fresh process (tests/helpers/direct_render.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [PY, str(REPO / "tests" / "helpers" / "direct_render.py"), str(scene), str(out_dir),
            "--frames", ",".join(map(str, frames))]
    for key, val in settings.items():
        if val is not None:
            args += [f"--{key.replace('_', '-')}", *map(str, val if isinstance(val, (list, tuple)) else [val])]
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


@pytest.fixture(scope="module")
def loop():
    """An event loop for a module's tests that drive asyncio code (a Blender runtime child) step by step."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
