"""Multi-host proof: the coordinator and two workers each in a network namespace of their own (tests/netns.py),
so that they share nothing but a network: a bridged private /24, as hosts on a LAN would.

`farm serve` binds both planes to its namespace's address; each worker connects to it over the bridge with
its own cache directory, and gets the scene by the ZeroMQ blob transfer (no disk path to it is ever given
to a worker); the test process submits over HTTP from the root namespace through its own leg on the bridge.
The job renders across both workers, pixel-equal to direct bpy renders; a worker cannot reach what listens
on the coordinator's loopback, and the coordinator's worker sockets are connections from the workers'
addresses. Without permission to make namespaces the test fails, saying why (it never skips).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from client import localfarm
from tests import netns
from tests.conftest import TEST_ENV, submit_sample, wait_job, wait_workers
from tests.e2e.test_e2e import assert_frames_match

pytestmark = pytest.mark.slow
ROLES = ["coord", "w1", "w2"]


@pytest.fixture
def lab():
    try:
        lab = netns.make_lab(ROLES)
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"cannot make network namespaces for the multi-host test: {exc}", pytrace=False)
    yield lab
    left = lab.teardown()
    assert not left, f"could not remove {left}: delete them by hand (ip netns del / ip link del)"


def _established(lab: netns.Lab, role: str, port: int) -> set[str]:
    """Peer addresses of the TCP connections established to ``port`` in ``role``'s namespace."""
    res = lab.run(role, ["ss", "-Htn", "state", "established", f"( sport = :{port} )"])
    assert res.returncode == 0, res.stderr
    return {line.split()[-1].rsplit(":", 1)[0] for line in res.stdout.splitlines() if line.strip()}


def test_job_renders_across_hosts_in_separate_network_namespaces(lab, procs, reference_frames, tmp_path):
    env = localfarm.process_env(TEST_ENV)
    coord_addr = lab.addrs["coord"]
    f = localfarm.Coordinator(tmp_path / "coord", env, host=coord_addr)
    f.launcher = lab.launcher("coord")
    procs.append(f)
    f.start(timeout=60)  # answers /api/health to the test, in the root namespace, over the bridge
    assert f.endpoint == f"tcp://{coord_addr}:{f.zport}"
    workers = {}
    for wid in ("w1", "w2"):
        w = localfarm.WorkerProc(tmp_path / wid, f, wid, env, 1, gpus="none")
        w.launcher = lab.launcher(wid)
        procs.append(w)
        workers[wid] = w.start()
    alice = f.creator("alice")
    wait_workers(alice, 2, timeout=120)

    # ------------------------------------------------ three network stacks: loopbacks are not shared
    probe = subprocess.Popen([*lab.launcher("coord"), sys.executable, "-c",
                              "import socket, sys, time\ns = socket.socket()\n"
                              f"s.bind(('127.0.0.1', {f.zport})); s.listen(8); print('listening', flush=True)\n"
                              "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout.readline().strip() == "listening"
        loop_z, lan_z, lan_h = ("127.0.0.1", f.zport), (coord_addr, f.zport), (coord_addr, f.hport)
        assert lab.reachable("coord", [loop_z, lan_z, lan_h]) == {loop_z: "open", lan_z: "open", lan_h: "open"}
        for wid in ("w1", "w2"):
            seen = lab.reachable(wid, [loop_z, ("127.0.0.1", f.hport), lan_z, lan_h])
            assert seen == {loop_z: "refused", ("127.0.0.1", f.hport): "refused", lan_z: "open", lan_h: "open"}, \
                f"{wid} reaches the coordinator's loopback, or not its address: {seen}"
    finally:
        probe.kill()
        probe.wait(10)
    for wid in ("w1", "w2"):
        links = lab.run(wid, ["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"{lab.addrs[wid]}/" in links and f"{coord_addr}/" not in links, links
    # the coordinator's worker-plane connections come from the workers' addresses, over the bridge
    assert _established(lab, "coord", f.zport) == {lab.addrs["w1"], lab.addrs["w2"]}

    # ------------------------------------------------ a job across them
    job = submit_sample(alice, "1-8")
    done = wait_job(alice, job["id"], timeout=240)
    assert done["status"] == "rendered", done
    outs = assert_frames_match(alice, job["id"], range(1, 9), reference_frames, tmp_path / "out")
    assert {o["worker_id"] for o in outs} == {"w1", "w2"}, "both workers rendered frames"
    scene = job["spec"]["scene_sha256"]
    for wid in ("w1", "w2"):  # each fetched the scene over ZeroMQ into its own cache
        assert (tmp_path / wid / "blobs" / scene).is_file(), f"{wid} has no copy of the scene"
        assert f"connected to tcp://{coord_addr}:{f.zport}" in workers[wid].log.read_text()
    assert all(w.alive for w in workers.values()) and f.alive
