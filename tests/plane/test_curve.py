"""CurveZMQ on the worker plane (farm/plane/gate.py, worker/keys.py).

End to end with real `farm serve` and `farm worker` processes on loopback: a render through a TCP tap that
records every byte on the wire (none of the protocol, the scene or the frames is readable there); a
worker pinning another key fails closed and says which setting to check; allowlist, token and open
admission; a revoked worker's lease goes to another worker. Then the keyring's files on their own.
"""
from __future__ import annotations

import json
import socket
import stat
import subprocess
import threading

import pytest
import zmq

from client import localfarm
from common import keys
from common import protocol as P
from common.limits import PROTOCOL_HEADER
from farm.plane import gate as curve
from tests.conftest import PY, REPO, SAMPLE, TEST_ENV, submit_sample, wait_for, wait_job, wait_workers
from tests.e2e.test_e2e import assert_frames_match


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "client.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=localfarm.process_env(TEST_ENV))


def _admin_cli(f: localfarm.Coordinator, *args: str) -> str:
    res = _cli(*args, "--url", f.url, "--token", (f.data / "admin.token").read_text().strip())
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr  # tables go to stderr


def _key_of(cache) -> str:
    """The worker's public key as `farm worker --print-key` shows it (made in its cache on first use)."""
    res = _cli("worker", "--print-key", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip()
    assert keys.is_key(key), key
    return key


def _online(client) -> set[str]:
    return {w["id"] for w in client.workers() if w["online"]}


def _log_has(proc: localfarm.Proc, text: str):
    return lambda: text in proc.log.read_text(errors="replace")


class Tap:
    """A TCP relay between a worker and the coordinator that keeps every byte it forwards, both ways:
    what anyone watching the network would see."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.wire = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.wire += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


# ------------------------------------------------------------------ end to end, real processes
@pytest.mark.slow
def test_render_over_curve_shows_nothing_on_the_wire(farm, worker, reference_frames, tmp_path):
    f = farm()  # loopback: open admission, every connection encrypted
    assert "worker plane encrypted (CurveZMQ)" in f.log.read_text()
    tap = Tap(f.zport)
    try:
        worker(f, "tapped-worker", args=["--coordinator", f"tcp://127.0.0.1:{tap.port}"])
        alice = f.creator("alice")
        wait_workers(alice, 1)
        job = submit_sample(alice, "1-2")
        assert wait_job(alice, job["id"])["status"] == "rendered"
        assert_frames_match(alice, job["id"], [1, 2], reference_frames, tmp_path / "out")
    finally:
        tap.close()
    wire = bytes(tap.wire)
    scene = SAMPLE.read_bytes()
    assert len(wire) > len(scene), "the scene went to the worker through the tap"
    assert b"CURVE" in wire, "the ZMTP greeting names the mechanism"
    for clear in (PROTOCOL_HEADER, b"tapped-worker", b"runtimes", b"\x89PNG\r\n\x1a\n", scene[4096:4160],
                  scene[60000:60064]):
        assert clear not in wire, f"{clear[:20]!r} travelled in clear"
    # the coordinator recorded which key this worker id belongs to
    w = {x["id"]: x for x in alice.workers()}["tapped-worker"]
    assert w["public_key"] == _key_of(tmp_path / "tapped-worker")


@pytest.mark.slow
def test_wrong_server_key_and_plain_sockets_get_nothing(farm, worker, tmp_path):
    f = farm()
    impostor_key = zmq.curve_keypair()[0].decode()
    w = worker(f, "pinned-elsewhere", args=["--server-key", impostor_key])
    wait_for(_log_has(w, "Check --server-key"), 60, what="the worker to explain the failed handshake")
    assert w.alive, "it keeps trying (with backoff), it does not crash"
    # a plain ZMTP client (no CURVE) is not even answered
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(f.endpoint)
    try:
        plain.send_multipart(P.encode(P.Hello("plain", "", 1, {"runtimes": ["blender"]})))
        assert not plain.poll(2000), "a plain socket got an answer"
    finally:
        plain.close(0)
    assert f.admin.workers() == [], "neither reached the coordinator"
    assert "pinned-elsewhere" not in f.log.read_text()
    # without any --server-key a worker refuses to start
    res = _cli("worker", "--coordinator", f.endpoint, "--cache", str(tmp_path / "nokey"))
    assert res.returncode == 2 and "--server-key is needed" in res.stderr


@pytest.mark.slow
def test_allowlist_refuses_unknown_key_until_allowed(farm, worker, tmp_path):
    f = farm(env={"RENDERHIVE_ADMIT": "allowlist"})
    key = _key_of(tmp_path / "w1")  # the same cache the worker below uses
    w1 = worker(f, "w1")
    wait_for(_log_has(f, f"refused worker key {key}"), 60, what="the coordinator to log the refused key")
    wait_for(_log_has(w1, "refused this worker's key"), 30, what="the worker to say it was refused")
    assert _online(f.admin) == set()
    assert "allowed" in _admin_cli(f, "workers", "allow", f"--key={key}")  # a Z85 key may start with '-'
    wait_workers(f.admin, 1, timeout=60)  # its next reconnect (backoff) is admitted
    # an edit of the allow-list is picked up: the key taken off it is expelled at once
    allowed = f.data / "curve" / "allowed"
    allowed.write_text("".join(ln for ln in allowed.read_text().splitlines(True) if key not in ln))
    wait_for(lambda: _online(f.admin) == set(), 30, what="the worker to be expelled")
    assert f"expelled key {key}" in f.log.read_text()


@pytest.mark.slow
def test_token_admits_the_right_token_and_holds_ids_to_keys(farm, worker, tmp_path):
    f = farm(env={"RENDERHIVE_ADMIT": "token"})
    worker(f, "w1")  # localfarm hands workers the token file
    wait_workers(f.admin, 1)
    key1 = _key_of(tmp_path / "w1")
    assert key1 in (f.data / "curve" / "allowed").read_text(), "enrolled keys join the allow-list"
    key2 = _key_of(tmp_path / "w2")
    w2 = worker(f, "w2", args=["--enroll-token", "rhe_not-the-token"])
    wait_for(_log_has(w2, "its HELLO carried a wrong enrollment token"), 60, what="the worker to be told")
    assert f"refused worker key {key2}" in f.log.read_text()
    # the right token but another worker's id: refused, and w1 keeps its connection
    thief = localfarm.WorkerProc(tmp_path / "thief", f, "w1", localfarm.process_env(TEST_ENV), gpus="none")
    thief.start()
    try:
        wait_for(_log_has(thief, "belongs to another worker key"), 60, what="the id thief to be refused")
    finally:
        thief.stop()
    assert _online(f.admin) == {"w1"}
    assert {x["id"]: x["public_key"] for x in f.admin.workers()}["w1"] == key1
    assert "w1" in _admin_cli(f, "workers")  # the table, with its key column
    assert "w2" not in {x["id"] for x in f.admin.workers()}


def _running_on(client, job_id, worker_id):
    return any(t["status"] == "running" and t["worker_id"] == worker_id for t in client.job(job_id)["task_list"])


@pytest.mark.slow
def test_revoked_worker_loses_its_lease_and_is_refused(farm, worker, procs, reference_frames, tmp_path):
    f = farm()
    slow = localfarm.WorkerProc(tmp_path / "w1", f, "w1", localfarm.process_env(TEST_ENV), gpus="none",
                                module="tests.helpers.slow_worker", argv_prefix=["--delay", "6"])
    procs.append(slow)
    slow.start()
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = submit_sample(alice, "1-2", chunk=2)  # one task, held by w1 for 6 s more than its render
    wait_for(lambda: _running_on(alice, job["id"], "w1"), 60, interval=0.05, what="w1 rendering")
    key1 = _key_of(tmp_path / "w1")
    out = _admin_cli(f, "workers", "revoke", "w1")
    assert f"key {key1} revoked" in out and "1 lease(s) requeued" in out, out
    worker(f, "w2")
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    outs = assert_frames_match(alice, job["id"], [1, 2], reference_frames, tmp_path / "out")
    assert {o["worker_id"] for o in outs} == {"w2"}
    detail = alice.job(job["id"])
    assert any("revoked" in e["detail"] for e in detail["events"]), detail["events"]
    # w1 tries again and is refused during the handshake, logged with its key
    wait_for(_log_has(f, f"refused worker key {key1}"), 60, what="the revoked key's reconnect to be refused")
    wait_for(_log_has(slow, "refused this worker's key"), 30, what="w1 to say it was refused")
    assert _online(alice) == {"w2"}
    assert key1 in (f.data / "curve" / "revoked").read_text()


# ------------------------------------------------------------------ the keyring on its own
def test_keyring_files_are_private_and_reloaded(tmp_path):
    kr = curve.Keyring(tmp_path, "allowlist")
    d = tmp_path / "curve"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("server.key", "server.key_secret", "enroll.token"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert keys.read_public_key(str(d / "server.key")) == kr.public  # pyzmq's certificate format
    assert keys.read_public_key(kr.server_key) == kr.public
    with pytest.raises(keys.KeyFileError, match="neither a Z85 public key"):
        keys.read_public_key("not-a-key")
    res = _cli("serve", "--print-key", "--data", str(tmp_path))
    assert res.returncode == 0 and res.stdout.strip() == kr.server_key, res.stderr
    again = curve.Keyring(tmp_path, "token")
    assert (again.public, again.secret, again.token) == (kr.public, kr.secret, kr.token), "made once, then kept"
    assert kr.token.startswith("rhe_") and kr.token_ok(kr.token) and not kr.token_ok("rhe_x")

    a = next(k for k in iter(lambda: zmq.curve_keypair()[0].decode(), None) if "#" in k)  # "#" is a Z85 character
    b = zmq.curve_keypair()[0].decode()
    assert not keys.is_key("#" * 40) and not keys.is_key(a[:-1] + "'")
    assert kr.admits_handshake(a) == (False, "the key is not on the allow-list")
    (d / "allowed").write_text(f"# my farm's machines\n{a}  # render box\nnot-a-key\n")
    assert kr.refresh() == set() and kr.admits_handshake(a) == (True, "")
    assert kr.allow(b) and not kr.allow(b)
    assert kr.bind("box", a) is None and "belongs to another" in kr.bind("box", b)
    kr.revoke(a)
    assert kr.admits_handshake(a) == (False, "the key was revoked") and "box" not in kr.bindings
    text = (d / "allowed").read_text()
    assert "# my farm's machines" in text and a not in text and b in text, "comments survive the edit"
    (d / "allowed").write_text("")  # the operator empties the list: b is no longer admitted
    assert kr.refresh() == {b}


@pytest.mark.parametrize("bind, mode", [("tcp://127.0.0.1:5555", "open"), ("tcp://[::1]:5555", "open"),
                                        ("tcp://localhost:5555", "open"), ("ipc:///tmp/farm", "open"),
                                        ("tcp://*:5555", "token"), ("tcp://0.0.0.0:5555", "token"),
                                        ("tcp://10.1.2.3:5555", "token"), ("tcp://eth0:5555", "token")])
def test_auto_admission_is_open_only_on_loopback(bind, mode):
    assert curve.resolve_mode("auto", bind) == mode
    assert curve.resolve_mode("allowlist", bind) == "allowlist"


def test_one_key_claims_at_most_max_worker_ids_and_an_address_only_so_many_handshakes(tmp_path):
    """The attack: 1,023 fake worker ids from one key each got a permanent Worker row; throw-away keys from
    one host each held a connection. A key holds at most MAX_WORKER_IDS_PER_KEY ids (refused with the fix
    in its DISCONNECT), and an address starts at most HANDSHAKE_BURST handshakes, then HANDSHAKES_PER_MINUTE."""
    from farm import constants as C
    kr = curve.Keyring(tmp_path, "open")
    gate = curve.Gate(kr)
    key = zmq.curve_keypair()[0].decode()
    admitted = [gate.admit([f"peer{i}".encode(), *P.encode(P.Hello(f"fake-{i}", "", 1, {}, []))], key)
                for i in range(C.MAX_WORKER_IDS_PER_KEY + 5)]
    assert admitted == [True] * C.MAX_WORKER_IDS_PER_KEY + [False] * 5
    why = gate.out[-1][1].reason
    assert why.startswith(f"this worker key holds {C.MAX_WORKER_IDS_PER_KEY} worker ids already, the most one "
                          "key may: reuse one of them (--worker-id)")
    assert gate.admit([b"again", *P.encode(P.Hello("fake-3", "", 1, {}, []))], key), "its own ids stay usable"
    assert len(json.loads((tmp_path / "curve" / "workers").read_text())) == C.MAX_WORKER_IDS_PER_KEY

    now = [0.0]
    budget = curve.AddressBudget(per_minute=60, burst=3, clock=lambda: now[0])
    assert [budget.take("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert budget.take("10.0.0.2"), "another address has its own budget"
    now[0] += 1.0
    assert budget.take("10.0.0.1") and not budget.take("10.0.0.1"), "one a second comes back"
    for i in range(5000):
        budget.take(f"host-{i}")
    assert len(budget.buckets) <= 4096, "the budget's memory is bounded"
