"""Attacks on the coordinator's HTTP server, over raw sockets against a real uvicorn on a random loopback
port (the app on a SQLite file and a blob store in tmp_path, the protocol of :mod:`farm.web.connections`
with short timeouts), and one against a real ``farm serve`` process: half-sent heads, idle connections
beyond the caps, stalled and crawling bodies, slow but honest uploads, bursts of submissions and uploads,
and a flood of 300 half-sent connections watched through the coordinator's /proc/PID/fd.

Timed assertions are bounds (the machine may have two slow cores): "closed after the timeout and well
before it would have been without one", never "within 10 ms of it".
"""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from farm.web.app import create_app
from farm.web.connections import HttpLimits, uvicorn_options
from farm.web.guard import RateLimiter
from tests.conftest import wait_for
from tests.fixtures_inproc import SCENE_BYTES, make_engine_and_store, make_user, sha256

pytestmark = pytest.mark.timeout(90)

HEAD = "GET /api/health HTTP/1.1\r\nHost: farm\r\n"
"""The first lines of a request whose head never ends (no blank line): what the 1,100 connections sent."""


@pytest.fixture
def serve(tmp_path):
    """Factory: ``serve(**limits)`` starts uvicorn in a thread with the guarded protocol and ``HttpLimits(**limits)``
    (and the rate limits of the environment, read when the app is made); returns port, tokens, store,
    and the server's connection table. Every server is stopped at the end of the test."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def make(**limits) -> dict:
        engine, blobs = make_engine_and_store(tmp_path / f"farm{len(started)}")
        _, alice = make_user(engine, "alice")
        _, bob = make_user(engine, "bob")
        options = uvicorn_options(HttpLimits(**limits))
        config = uvicorn.Config(create_app(engine, blobs), host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", **options)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return {"port": server.servers[0].sockets[0].getsockname()[1], "alice": alice, "bob": bob,
                "blobs": blobs, "table": options["http"].table}

    yield make
    for server, thread in started:
        server.should_exit = True
    for server, thread in started:
        thread.join(10)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def answer(s: socket.socket, timeout: float = 10.0) -> tuple[int | None, dict[str, str], bytes, float]:
    """Read what the server sends until it closes or a response is complete: (status, or None when it closed
    without a word; headers; body; seconds it took)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, body = data.split(b"\r\n\r\n", 1)
            headers = dict(line.split(": ", 1) for line in head.decode("latin-1").lower().split("\r\n")[1:])
            if len(body) >= int(headers.get("content-length", 1 << 60)):
                break
    took = time.monotonic() - t0
    if not data:
        return None, {}, b"", took
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").lower().split("\r\n")[1:])
    return int(head.split()[1]), headers, body, took


def detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def request(port: int, method: str, path: str, token: str | None = None, body: bytes = b"",
            source: str = "127.0.0.1") -> tuple[int | None, dict[str, str], bytes, float]:
    with connect(port, source) as s:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: farm\r\n{auth}Content-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n".encode() + body)
        return answer(s)


def closed(s: socket.socket, timeout: float) -> bool:
    """Whether the server closed ``s`` within ``timeout`` seconds (reading and dropping what it sent)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


# ------------------------------------------------------------------ the header deadline
def test_a_half_sent_head_is_answered_408_and_closed_after_the_header_timeout(serve):
    farm = serve(header_timeout=0.5)
    port = farm["port"]
    with connect(port) as s:
        s.sendall(HEAD.encode())
        status, _, body, took = answer(s)
    assert status == 408 and detail(body) == ("the request line and headers did not arrive within 0.5 s: send "
                                              "the whole request head at once")
    assert 0.4 <= took < 5, took
    with connect(port) as s:  # nothing sent: closed without a word (no stray 408 for a keep-alive pool)
        status, _, _, took = answer(s)
    assert status is None and 0.4 <= took < 5, took
    with connect(port) as s:  # slowloris: a byte every 0.1 s does not move the deadline
        t0 = time.monotonic()
        for ch in HEAD.encode() * 10:
            try:
                s.send(bytes([ch]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([s], [], [], 0.1)[0]:
                break
        status, _, body, _ = answer(s)
        assert status == 408 and "did not arrive within 0.5 s" in detail(body)
        assert time.monotonic() - t0 < 5, "the trickle held the connection past its deadline"
    with connect(port) as s:  # keep-alive: the deadline runs from the end of the previous response
        s.sendall(HEAD.encode() + b"\r\n")
        status, _, body, _ = answer(s)
        assert status == 200 and json.loads(body)["ok"] is True
        t0 = time.monotonic()
        time.sleep(0.2)
        s.sendall(HEAD.encode())  # a byte cancels uvicorn's keep-alive timer; the head deadline stays
        status, _, body, _ = answer(s)
        assert status == 408 and "did not arrive within 0.5 s" in detail(body)
        assert 0.4 <= time.monotonic() - t0 < 5
    wait_for(lambda: farm["table"].total == 0, 5, what="every connection released")


# ------------------------------------------------------------------ bounded connections
def test_connections_beyond_the_cap_are_refused_until_the_idle_ones_time_out(serve):
    farm = serve(header_timeout=1.5, max_connections=8, max_per_ip=100)
    port, table = farm["port"], farm["table"]
    idle = [connect(port) for _ in range(8)]
    try:
        for s in idle:
            s.sendall(HEAD.encode())
        wait_for(lambda: table.total == 8, 5, what="8 connections admitted")
        with connect(port) as extra:
            status, headers, body, took = answer(extra)
        assert status == 503 and detail(body) == ("the coordinator has 8 HTTP connections open, its limit "
                                                  "(RENDERHIVE_HTTP_MAX_CONNECTIONS): retry in a few seconds")
        assert headers["retry-after"] == "2" and took < 1.5, "refused at once, not after a timeout"
        status, _, _, _ = request(port, "GET", "/api/me", farm["alice"])
        assert status == 503, "a real client is refused too while the cap is full"
        assert all(closed(s, 10) for s in idle), "the header deadline frees the slots"
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: table.total == 0, 5, what="the slots released")
    status, _, body, took = request(port, "GET", "/api/me", farm["alice"])
    assert status == 200 and json.loads(body)["name"] == "alice" and took < 5


def test_one_address_cannot_take_the_whole_cap(serve):
    farm = serve(header_timeout=5, max_connections=100, max_per_ip=4)
    port, table = farm["port"], farm["table"]
    held = [connect(port) for _ in range(4)]
    try:
        wait_for(lambda: table.by_client.get("127.0.0.1") == 4, 5, what="4 connections from 127.0.0.1")
        with connect(port) as extra:
            status, _, body, took = answer(extra)
        assert status == 503 and detail(body) == (
            "too many connections from your address (4 open, the limit per address is 4, "
            "RENDERHIVE_HTTP_MAX_PER_IP): close idle connections or reuse one (keep-alive), then retry")
        assert took < 2
        status, _, body, _ = request(port, "GET", "/api/me", farm["bob"], source="127.0.0.2")
        assert status == 200 and json.loads(body)["name"] == "bob", "another address is served"
        wait_for(lambda: table.total == 4 and table.by_client == {"127.0.0.1": 4}, 5,
                 what="127.0.0.2's closed connection released, 127.0.0.1's four still held")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: table.total == 0 and table.by_client == {}, 5, what="the table emptied")


# ------------------------------------------------------------------ bodies: stalled, crawling, slow but moving
def upload_head(sha: str, token: str, length: int) -> bytes:
    return (f"PUT /api/blobs/{sha} HTTP/1.1\r\nHost: farm\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_stalled_body_is_408_and_the_route_sees_a_disconnect(serve):
    farm = serve(header_timeout=2, body_idle_timeout=0.5)
    data = os.urandom(100_000)
    with connect(farm["port"]) as s:
        s.sendall(upload_head(sha256(data), farm["alice"], len(data)) + data[:1000])
        status, _, body, took = answer(s)
    assert status == 408 and detail(body) == ("no bytes of the request body arrived for 0.5 s: check the "
                                              "connection and send the request again")
    assert 0.4 <= took < 5, took
    tmp = farm["blobs"].root / "tmp"
    wait_for(lambda: list(tmp.iterdir()) == [], 5, what="the upload route to delete its temporary file")
    assert not farm["blobs"].has(sha256(data))
    wait_for(lambda: farm["table"].total == 0, 5, what="the connection released")


def test_a_crawling_body_is_cut_at_the_minimum_rate(serve):
    farm = serve(header_timeout=2, body_idle_timeout=0.5, body_min_rate=2000)
    data = os.urandom(100_000)
    with connect(farm["port"]) as s:
        s.sendall(upload_head(sha256(data), farm["alice"], len(data)))
        t0 = time.monotonic()
        for i in range(0, 2000, 20):  # 20 bytes every 0.1 s: 200 bytes/s, never idle for 0.5 s
            if select.select([s], [], [], 0.1)[0]:
                break
            try:
                s.send(data[i:i + 20])
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, body, _ = answer(s)
    assert status == 408 and detail(body).startswith("the request body arrived at ")
    assert detail(body).endswith(" bytes/s, under the minimum of 2000 bytes/s (RENDERHIVE_HTTP_BODY_MIN_RATE): "
                                 "send it over a faster connection")
    assert time.monotonic() - t0 < 5, "cut off long before the 10 s the crawl would take"
    assert not farm["blobs"].has(sha256(data))


def test_a_slow_but_moving_upload_succeeds(serve):
    """384 KiB in 24 pieces, one every 0.125 s: 3 s in all, six body timeouts and two head timeouts long."""
    farm = serve(header_timeout=0.5, body_idle_timeout=0.5, body_min_rate=2000)
    data = os.urandom(24 * 16 * 1024)
    with connect(farm["port"]) as s:
        s.sendall(upload_head(sha256(data), farm["alice"], len(data)))
        for i in range(0, len(data), 16 * 1024):
            time.sleep(0.125)
            s.sendall(data[i:i + 16 * 1024])
        status, _, body, _ = answer(s)
    assert status == 201, body
    assert json.loads(body) == {"sha256": sha256(data), "size": len(data), "stored": True}
    assert farm["blobs"].read(sha256(data), 0, len(data)) == data
    more = os.urandom(64 * 1024)  # a client that waits for 100 Continue before it sends the body
    with connect(farm["port"]) as s:
        s.sendall(upload_head(sha256(more), farm["alice"], len(more)).replace(b"\r\n\r\n",
                                                                           b"\r\nExpect: 100-continue\r\n\r\n"))
        s.settimeout(5)
        assert s.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        time.sleep(0.3)
        s.sendall(more)
        status, _, body, _ = answer(s)
    assert status == 201 and json.loads(body)["size"] == len(more)


# ------------------------------------------------------------------ rate limits per user
def test_submits_and_uploads_are_rate_limited_per_user(serve, monkeypatch):
    for name, value in {"SUBMITS_PER_MINUTE": "60", "SUBMIT_BURST": "2", "UPLOADS_PER_MINUTE": "6",
                        "UPLOAD_BURST": "3"}.items():
        monkeypatch.setenv(f"RENDERHIVE_{name}", value)
    farm = serve()
    alice, bob = ({"Authorization": f"Bearer {farm[n]}"} for n in ("alice", "bob"))
    scene = sha256(SCENE_BYTES)
    with httpx.Client(base_url=f"http://127.0.0.1:{farm['port']}", timeout=10) as http:
        def submit(who):
            return http.post("/api/jobs", json={"scene_sha256": scene, "frames": "1"}, headers=who)
        assert http.put(f"/api/blobs/{scene}", content=SCENE_BYTES, headers=alice).status_code == 201
        assert [submit(alice).status_code for _ in range(2)] == [201, 201]
        r = submit(alice)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["detail"] == ("too many job submissions: 60 a minute are allowed, 2 at once; try again in "
                                      "1 s, and put more frames in one job (frames 1-250, --chunk) instead of "
                                      "many jobs")
        assert submit(bob).status_code == 201, "another user's bucket is full"
        assert http.get("/api/jobs", headers=alice).status_code == 200, "reading is not limited"
        time.sleep(float(r.headers["retry-after"]) + 0.1)
        assert submit(alice).status_code == 201, "the bucket refilled"
        assert submit(alice).status_code == 429
        for i in range(2):  # alice's first upload took one of her three
            assert http.put(f"/api/blobs/{sha256(b'%d' % i)}", content=b"%d" % i, headers=alice).status_code == 201
        r = http.put(f"/api/blobs/{sha256(b'x')}", content=b"x", headers=alice)
        retry = r.headers.get("retry-after")
        assert r.status_code == 429 and 1 <= int(retry) <= 10, (r.status_code, retry)  # a token each 10 s
        assert r.json()["detail"].startswith(f"too many uploads: 6 a minute are allowed, 3 at once; try again in "
                                             f"{retry} s, and send small files in batches (POST /api/blobs/batch")
        assert "POST /api/blobs/missing" in r.json()["detail"]
        assert not farm["blobs"].has(sha256(b"x"))
        r = http.post("/api/jobs", json={}, headers={"Authorization": "Bearer nobody"})
        assert r.status_code == 401, "anonymous requests are refused before any bucket is looked at"


def test_the_rate_limiter_keeps_a_bounded_lru_of_buckets():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, max_keys=3, clock=lambda: now[0])
    assert [limiter.take(1), limiter.take(1)] == [0.0, 0.0]
    assert limiter.take(1) == pytest.approx(1.0)
    for user in (2, 3, 4):
        assert limiter.take(user) == 0.0
    assert list(limiter.buckets) == [2, 3, 4], "user 1, least recently used, was dropped"
    for user in range(100, 10_100):
        limiter.take(user)
    assert len(limiter.buckets) == 3
    assert limiter.take(10_099) == 0.0 and limiter.take(10_099) == pytest.approx(1.0)
    now[0] = 0.5
    assert limiter.take(10_099) == pytest.approx(0.5), "half a token refilled in half a second"
    now[0] = 1.0
    assert limiter.take(10_099) == 0.0


# ------------------------------------------------------------------ the flood, against farm serve
def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_half_sent_connections_costs_bounded_descriptors(farm):
    """The attack that exhausted the coordinator: 300 half-sent requests from one address, against
    ``farm serve`` with a 4 s head deadline. It holds at most 64 descriptors for them (the per-address cap),
    refuses the rest at once, keeps answering a creator from another address within a second, and is back
    to where it started after the deadline."""
    f = farm(env={"RENDERHIVE_HTTP_HEADER_TIMEOUT": "4", "RENDERHIVE_HTTP_MAX_CONNECTIONS": "128"})
    pid, port = f.p.pid, f.hport
    token = (f.data / "admin.token").read_text().strip()
    assert request(port, "GET", "/api/me", token)[0] == 200
    base = fd_count(pid)
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            s = connect(port)
            s.sendall(HEAD.encode())
            flood.append(s)
        time.sleep(0.5)
        refused = [s for s in flood if select.select([s], [], [], 0)[0]]
        assert len(refused) >= 300 - 64, f"only {len(refused)} of 300 refused"
        status, _, body, _ = answer(refused[0])
        assert status == 503 and detail(body).startswith("too many connections from your address (64 open")
        for _ in range(5):  # during the attack: descriptors bounded, a creator answered
            count = fd_count(pid)
            assert count <= base + 64 + 16, f"{count} descriptors open ({base} before the flood)"
            status, _, body, took = request(port, "GET", "/api/me", token, source="127.0.0.2")
            assert status == 200 and json.loads(body)["name"] == "admin" and took < 1.0, (status, took)
            time.sleep(0.2)
        # the clients keep their sockets open: the server's head deadline is what closes them
        wait_for(lambda: fd_count(pid) <= base + 4, 15, what="descriptors back to where they were")
        assert all(closed(s, 5) for s in flood)
    finally:
        for s in flood:
            s.close()
    log = Path(f.log).read_text()
    assert "open file limit" in log and "HTTP connections are capped at 128, 64 per address" in log
