"""The `farm` command line against a real coordinator and worker: submit with progress, status, the review
step before results, results, cancel, workers; --json output for scripts; clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE, wait_workers

pytestmark = pytest.mark.slow


def farm_cli(f, client, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RENDERHIVE_URL": f.url, "RENDERHIVE_TOKEN": client.token}
    res = subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_submit_review_results_from_the_command_line(farm, worker, tmp_path):
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    common = ["--frames", "1-3", "--resolution-percent", "20", "--samples", "4"]
    # scripts: --json prints the job id; --wait without --approve says how to review, downloads nothing
    res = farm_cli(f, alice, "submit", str(SAMPLE), *common, "--wait", "--out", str(tmp_path / "early"))
    assert "farm approve" in res.stdout and not (tmp_path / "early").exists()
    job_id = int(res.stdout.split("job ")[1].split()[0])
    refused = farm_cli(f, alice, "results", str(job_id), "--out", str(tmp_path / "r"), check=False)
    assert refused.returncode == 2 and "approve" in refused.stderr
    farm_cli(f, alice, "approve", str(job_id))
    farm_cli(f, alice, "results", str(job_id), "--out", str(tmp_path / "r"))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]

    # --wait --approve --out: one command from scene to frames, and the scene is not uploaded again
    res = farm_cli(f, alice, "submit", str(SAMPLE), *common, "--wait", "--approve", "--out", str(tmp_path / "o"))
    assert "0 bytes uploaded" in res.stdout and "approved; 3 files" in res.stdout
    res = farm_cli(f, alice, "submit", str(SAMPLE), "--frames", "1", "--json")
    new_id = int(res.stdout.strip())
    status = json.loads(farm_cli(f, alice, "status", str(new_id), "--json").stdout)
    assert status["id"] == new_id and status["frames_total"] == 1
    assert json.loads(farm_cli(f, alice, "cancel", str(new_id), "--json").stdout)["status"] in ("canceled", "rendered")
    listed = json.loads(farm_cli(f, alice, "status", "--json").stdout)
    assert {j["id"] for j in listed} == {job_id, new_id, job_id + 1}
    workers = json.loads(farm_cli(f, alice, "workers", "--json").stdout)
    assert [w["id"] for w in workers] == ["w1"] and workers[0]["tasks_done"] >= 6

    # errors say what to do
    missing = farm_cli(f, alice, "submit", str(tmp_path / "nope.blend"), check=False)
    assert missing.returncode == 2 and "saved .blend" in missing.stderr
    bad = farm_cli(f, alice, "submit", str(SAMPLE), "--frames", "5-1", check=False)
    assert bad.returncode == 2 and "ends before it starts" in bad.stderr
    size = farm_cli(f, alice, "submit", str(SAMPLE), "--resolution", "1920by1080", check=False)
    assert size.returncode == 2 and "--resolution '1920by1080': write WIDTHxHEIGHT" in size.stderr
    alice.token = "rh_wrong"
    denied = farm_cli(f, alice, "status", check=False)
    assert denied.returncode == 2 and "token" in denied.stderr


def test_a_local_farm_gets_distinct_ports():
    """`farm serve` in the tests and benchmarks binds two ports; two calls of free_port() could return the same
    one (the kernel hands the port just released out again: a PostgreSQL e2e run once bound both planes to
    it and exited)."""
    from client import localfarm
    for _ in range(50):
        ports = localfarm.free_ports(4)
        assert len(set(ports)) == 4 and all(localfarm.port_free(p) for p in ports)
    for _ in range(20):
        c = localfarm.Coordinator(Path("/nonexistent"))
        assert c.zport != c.hport
    c = localfarm.Coordinator(Path("/nonexistent"), zmq_port=ports[0])
    assert c.zport == ports[0] and c.hport != ports[0]
