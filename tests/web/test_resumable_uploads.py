"""Resumable uploads (farm/web/api_uploads.py, farm/store/uploads.py) over real HTTP on loopback: a real
uvicorn in a thread with the guarded protocol, the app on a SQLite file and a blob store in tmp_path, and
the upload area's clock injected so that expiry is tested without waiting a day.

A connection killed after half the bytes is resumed by ``client.api.Client`` and sends only the rest
(counted by the server); the blob's hash is right. The bounds are attacks: offsets that are not the end,
wrong hashes, too many or too large partials, idle partials, anonymous and oversized bodies, floods of
pieces, two requests on one partial at once.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time

import httpx
import pytest
import uvicorn

from client.api import ApiError, Client
from farm.store.uploads import UploadArea
from farm.web.app import create_app
from farm.web.connections import HttpLimits, uvicorn_options
from tests.conftest import wait_for
from tests.fixtures_inproc import make_engine_and_store, make_user, sha256
from tests.web.test_http_limits import answer, connect, detail

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def serve(tmp_path):
    """Factory: ``serve(**area_limits)`` starts a farm's HTTP side; returns its url, tokens, ids, store, area
    and clock. Servers are stopped at the end of the test."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def make(max_bytes: int | None = None, **limits) -> dict:
        engine, blobs = make_engine_and_store(tmp_path / f"farm{len(started)}", max_bytes=max_bytes)
        alice, alice_token = make_user(engine, "alice")
        bob, bob_token = make_user(engine, "bob")
        clock = Clock()
        area = UploadArea(blobs, clock=clock, **limits)
        config = uvicorn.Config(create_app(engine, blobs, uploads=area), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="off", **uvicorn_options(HttpLimits()))
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        wait_for(lambda: server.started, 10, what="uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        return {"url": f"http://127.0.0.1:{port}", "port": port, "alice": alice_token, "bob": bob_token,
                "alice_id": alice.id, "bob_id": bob.id, "blobs": blobs, "area": area, "clock": clock}

    yield make
    for server, _thread in started:
        server.should_exit = True
    for _server, thread in started:
        thread.join(10)


def http(farm, who: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=farm["url"], timeout=30, headers={"Authorization": f"Bearer {farm[who]}"})


def patch_head(sha: str, token: str | None, offset: int, size: int, length: int) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"PATCH /api/blobs/{sha}/upload?offset={offset}&size={size} HTTP/1.1\r\nHost: farm\r\n{auth}"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode()


def partials(farm, who: str = "alice_id") -> list[str]:
    d = farm["area"].root / str(farm[who])
    return sorted(os.listdir(d)) if d.exists() else []


# ------------------------------------------------------------------ killed midway, resumed
def test_an_upload_killed_midway_resumes_with_only_the_rest(serve, tmp_path):
    farm = serve()
    data = os.urandom(6 * 1024 * 1024 + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    sha, half = sha256(data), len(data) // 2
    with connect(farm["port"]) as s:   # the whole length declared, half of it sent, then the connection dies
        s.sendall(patch_head(sha, farm["alice"], 0, len(data), len(data)))
        s.sendall(data[:half])
    client = Client(farm["url"], farm["alice"])
    wait_for(lambda: client.upload_standing(sha)["offset"] == half, 10, what="the server to keep the first half")
    assert farm["area"].received[(farm["alice_id"], sha)] == half
    assert client.upload_standing(sha) == {"sha256": sha, "offset": half, "size": len(data), "complete": False}
    assert not farm["blobs"].has(sha), "a partial is never a blob"

    seen: list[int] = []
    sent = client.upload_resumable(path, sha, seen.append)
    assert sent == len(data) - half, "only the rest was sent"
    assert farm["area"].received[(farm["alice_id"], sha)] == len(data), "the server received only the rest"
    assert sum(seen) == len(data), "progress counts the bytes the farm has, sent before or now"
    assert hashlib.sha256(farm["blobs"].path(sha).read_bytes()).hexdigest() == sha
    assert partials(farm) == [] and client.upload_standing(sha)["complete"] is True
    assert client.missing([sha]) == []
    assert client.upload_resumable(path, sha) == 0, "a stored blob is not sent again"


def test_the_client_resumes_by_itself_when_the_connection_drops(serve, tmp_path, monkeypatch):
    """A read error on the client side (the link breaks) in the middle of the PATCH: the client asks where
    the upload stands and sends the rest; every byte crosses the wire at most once more than the kill cost."""
    farm = serve()
    data = os.urandom(3 * 1024 * 1024)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    sha = sha256(data)
    from client import api as client_api
    real_read, calls = client_api._ProgressReader.read, {"n": 0}

    def flaky(self, n=-1):
        calls["n"] += 1
        if calls["n"] == 40:   # 2.5 MiB in (the client sends 64 KiB blocks): the link breaks
            raise ConnectionResetError("link down")
        return real_read(self, n)
    monkeypatch.setattr(client_api._ProgressReader, "read", flaky)
    client = Client(farm["url"], farm["alice"])
    sent = client.upload_resumable(path, sha, pause=0.05)
    assert calls["n"] > 40, "the link did break"
    got = farm["area"].received[(farm["alice_id"], sha)]
    assert got == len(data), "the server appended each byte once"
    assert len(data) <= sent < len(data) + 2 * 1024 * 1024, sent
    assert hashlib.sha256(farm["blobs"].path(sha).read_bytes()).hexdigest() == sha


# ------------------------------------------------------------------ offsets and hashes
def test_an_offset_that_is_not_the_end_is_refused_with_the_end(serve):
    farm = serve()
    data = os.urandom(10_000)
    sha = sha256(data)
    with http(farm) as h:
        r = h.patch(f"/api/blobs/{sha}/upload?offset=100&size=10000", content=data[100:])
        assert r.status_code == 409 and r.headers["upload-offset"] == "0"
        assert r.json()["detail"] == ("offset 100 is not where this upload stands: the farm has none of it; send it "
                                      "from offset 0")
        r = h.patch(f"/api/blobs/{sha}/upload?offset=0&size=10000", content=data[:4000])
        assert r.status_code == 200 and r.json()["offset"] == 4000 and r.json()["complete"] is False
        for bad in (0, 3999, 4001, 9000):
            r = h.patch(f"/api/blobs/{sha}/upload?offset={bad}&size=10000", content=data[bad:])
            assert r.status_code == 409 and r.headers["upload-offset"] == "4000", bad
            assert "the farm has 4000 of its 10000 bytes; send the rest from offset 4000" in r.json()["detail"]
        r = h.patch(f"/api/blobs/{sha}/upload?offset=4000&size=20000", content=data[4000:])
        assert r.status_code == 422 and "begun with a size of 10000 bytes" in r.json()["detail"]
        r = h.patch(f"/api/blobs/{sha}/upload?offset=4000&size=10000", content=data[4000:] + b"x")
        assert r.status_code == 413 and "longer than the 6000 bytes left" in r.json()["detail"]
        assert h.get(f"/api/blobs/{sha}/upload").json()["offset"] == 4000, "refusals changed nothing"
        r = h.patch(f"/api/blobs/{sha}/upload?offset=4000&size=10000", content=data[4000:])
        assert r.status_code == 201 and r.json() == {"sha256": sha, "offset": 10000, "size": 10000,
                                                     "complete": True, "stored": True, "received": 6000}
    assert farm["blobs"].path(sha).read_bytes() == data


def test_a_wrong_hash_discards_the_partial_and_says_so(serve):
    farm = serve()
    data = os.urandom(50_000)
    liar = sha256(b"something else")
    with http(farm) as h:
        assert h.patch(f"/api/blobs/{liar}/upload?offset=0&size=50000", content=data[:20_000]).status_code == 200
        r = h.patch(f"/api/blobs/{liar}/upload?offset=20000&size=50000", content=data[20_000:])
        assert r.status_code == 422
        assert r.json()["detail"] == (f"the uploaded bytes hash to {sha256(data)}, not {liar}: the upload was "
                                      "discarded; check that the file did not change while it was sent, and "
                                      "upload it again")
        assert h.get(f"/api/blobs/{liar}/upload").json() == {"sha256": liar, "offset": 0, "size": None,
                                                             "complete": False}
    assert not farm["blobs"].has(liar) and not farm["blobs"].has(sha256(data)) and partials(farm) == []


def test_a_chunked_body_without_a_length_is_bounded_by_the_size(serve):
    farm = serve()
    data = os.urandom(5000)
    sha = sha256(data)

    def pieces():
        yield data
        yield b"more than declared"
    with http(farm) as h:
        r = h.patch(f"/api/blobs/{sha}/upload?offset=0&size=5000", content=pieces())
        assert r.status_code == 413 and "those bytes were dropped" in r.json()["detail"]
        assert h.get(f"/api/blobs/{sha}/upload").json()["offset"] == 0
    assert not farm["blobs"].has(sha)


# ------------------------------------------------------------------ bounds per user, expiry
def test_partials_per_user_and_their_bytes_are_capped(serve):
    farm = serve(max_per_user=2, max_user_bytes=100_000)
    a, b, c = (os.urandom(40_000) for _ in range(3))
    with http(farm) as h, http(farm, "bob") as hb:
        for d in (a, b):
            assert h.patch(f"/api/blobs/{sha256(d)}/upload?offset=0&size=40000", content=d[:10]).status_code == 200
        r = h.patch(f"/api/blobs/{sha256(c)}/upload?offset=0&size=40000", content=c[:10])
        assert r.status_code == 429 and r.json()["detail"].startswith(
            "you have 2 unfinished uploads, the most a user may hold: finish or abandon one")
        assert hb.patch(f"/api/blobs/{sha256(c)}/upload?offset=0&size=40000", content=c[:10]).status_code == 200, \
            "another user's partials are their own"
        assert h.delete(f"/api/blobs/{sha256(a)}/upload").json()["discarded"] is True
        big = sha256(b"big")
        r = h.patch(f"/api/blobs/{big}/upload?offset=0&size=60001", content=b"x")
        assert r.status_code == 429 and r.json()["detail"] == (
            "your unfinished uploads hold 40000 bytes; 60001 more would pass the 100000 byte limit a user may "
            "hold unfinished: finish or abandon one first (DELETE /api/blobs/SHA/upload)")
        assert h.patch(f"/api/blobs/{sha256(c)}/upload?offset=0&size=40000", content=c).status_code == 201
        r = h.patch(f"/api/blobs/{big}/upload?offset=0&size={farm['blobs'].max_bytes + 1}", content=b"x")
        assert r.status_code == 422 and "byte limit" in r.json()["detail"]
    assert partials(farm) == [f"{sha256(b)}.40000"]


def test_a_partial_not_extended_for_the_idle_limit_is_dropped(serve):
    farm = serve(idle_seconds=3600)
    data = os.urandom(30_000)
    sha = sha256(data)
    with http(farm) as h:
        assert h.patch(f"/api/blobs/{sha}/upload?offset=0&size=30000", content=data[:10_000]).status_code == 200
        farm["clock"].now += 3000
        assert h.patch(f"/api/blobs/{sha}/upload?offset=10000&size=30000",
                       content=data[10_000:20_000]).status_code == 200, "extended in time"
        farm["clock"].now += 3500   # 6500 s after it began, 3500 after its last byte: kept
        assert h.get(f"/api/blobs/{sha}/upload").json()["offset"] == 20_000
        farm["clock"].now += 200    # 3700 s idle: dropped
        assert h.get(f"/api/blobs/{sha}/upload").json()["offset"] == 0
        assert partials(farm) == []
        r = h.patch(f"/api/blobs/{sha}/upload?offset=20000&size=30000", content=data[20_000:])
        assert r.status_code == 409 and r.headers["upload-offset"] == "0"
        # another user's idle partial is dropped when anyone begins one (no user needs to come back)
    with http(farm, "bob") as hb, http(farm) as h:
        other = os.urandom(100)
        assert hb.patch(f"/api/blobs/{sha256(other)}/upload?offset=0&size=200", content=other).status_code == 200
        farm["clock"].now += 4000
        assert h.patch(f"/api/blobs/{sha}/upload?offset=0&size=30000", content=data[:1]).status_code == 200
    assert partials(farm, "bob_id") == []


# ------------------------------------------------------------------ the guard's rules hold on this route
def test_anonymous_and_oversized_bodies_are_refused_before_they_are_read(serve):
    farm = serve(max_bytes=1_000_000)
    sha = sha256(b"x")
    with connect(farm["port"]) as s:   # no token: 401 on the head alone, the body never sent
        s.sendall(patch_head(sha, None, 0, 500_000, 500_000))
        status, _, body, took = answer(s)
    assert status == 401 and "the body was not read" in detail(body) and took < 5
    with connect(farm["port"]) as s:
        s.sendall(patch_head(sha, "not-a-token", 0, 500_000, 500_000))
        assert answer(s)[0] == 401
    with connect(farm["port"]) as s:   # over the blob limit: 413 on the declared length
        s.sendall(patch_head(sha, farm["alice"], 0, 2_000_000, 2_000_000))
        status, _, body, _ = answer(s)
    assert status == 413 and "exceeds the 1000000 byte limit" in detail(body)
    with connect(farm["port"]) as s:   # longer than what is left of the declared size: 413 before reading
        s.sendall(patch_head(sha, farm["alice"], 0, 100, 5000))
        status, _, body, _ = answer(s)
    assert status == 413 and "longer than the 100 bytes left" in detail(body)
    assert partials(farm) == []
    assert httpx.get(f"{farm['url']}/api/blobs/{sha}/upload").status_code == 401


def test_pieces_count_against_the_upload_rate(serve, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "6")
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "3")
    farm = serve()
    data = os.urandom(1000)
    sha = sha256(data)
    with http(farm) as h:
        codes = [h.patch(f"/api/blobs/{sha}/upload?offset={i * 10}&size=1000", content=data[i * 10:i * 10 + 10])
                 .status_code for i in range(4)]
        assert codes == [200, 200, 200, 429]
        assert h.get(f"/api/blobs/{sha}/upload").json()["offset"] == 30, "asking where it stands is free"


def test_two_requests_cannot_extend_one_partial_at_once(serve):
    farm = serve()
    data = os.urandom(200_000)
    sha = sha256(data)
    with connect(farm["port"]) as s, http(farm) as h:
        s.sendall(patch_head(sha, farm["alice"], 0, len(data), len(data)) + data[:50_000])
        wait_for(lambda: h.get(f"/api/blobs/{sha}/upload").json()["offset"] == 50_000, 10, what="the first piece")
        r = h.patch(f"/api/blobs/{sha}/upload?offset=50000&size=200000", content=data[50_000:])
        assert r.status_code == 409 and "another request is uploading" in r.json()["detail"]
        s.sendall(data[50_000:])
        assert answer(s)[0] == 201
    assert farm["blobs"].path(sha).read_bytes() == data


def test_the_client_says_when_the_farm_discarded_it_and_puts_small_files_whole(serve, tmp_path):
    farm = serve()
    path = tmp_path / "f.bin"
    path.write_bytes(b"small file")
    client = Client(farm["url"], farm["alice"])
    with pytest.raises(ApiError) as exc:
        client.upload_resumable(path, "0" * 64)
    assert exc.value.status == 422 and "f.bin" in str(exc.value) and "discarded" in str(exc.value)
    assert client.upload_any(path, sha256(b"small file"), resumable_above=1 << 20) == 10
    assert farm["blobs"].has(sha256(b"small file"))
    assert (farm["alice_id"], sha256(b"small file")) not in farm["area"].received, "one PUT, not the resumable route"
