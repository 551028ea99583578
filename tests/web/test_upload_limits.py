"""Hostile uploads through the real HTTP API (FastAPI app on a SQLite file and a blob store in tmp_path):
uploads over the size limit, decompression bombs, path traversal in every name a request carries, and
scenes that are not .blend files. Each is refused with a 4xx whose message says what to do, or stored as
plain bytes and never expanded, and nothing is stored, lost or written outside the data directory.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import zstandard
from fastapi.testclient import TestClient

from common import protocol as P
from farm.store.models import Blob, Job, Output, Task
from farm.web.app import create_app
from tests.fixtures_inproc import (
    SCENE_BYTES,
    Driver,
    make_engine_and_store,
    make_user,
    new_coordinator,
    of,
    output_blob,
    rows,
    sha256,
)

LIMIT = 64 * 1024
REPO = Path(__file__).resolve().parents[2]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def farm(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm", max_bytes=LIMIT)
    _, token = make_user(engine, "alice")
    with TestClient(create_app(engine, blobs)) as http:
        yield {"http": http, "engine": engine, "blobs": blobs, "alice": bearer(token), "root": tmp_path}


def put(farm, data: bytes, sha: str | None = None, **kw):
    return farm["http"].put(f"/api/blobs/{sha or sha256(data)}", content=data, headers={**farm["alice"], **kw})


def submit(farm, scene: str, **body):
    return farm["http"].post("/api/jobs", json={"scene_sha256": scene, "frames": "1", **body}, headers=farm["alice"])


def stored(farm) -> dict[str, bytes]:
    """Every blob in the store, by name, and a check that no temporary or partial file stayed behind."""
    root = farm["blobs"].root
    assert list((root / "tmp").iterdir()) == [], "a temporary upload file stayed behind"
    assert list((root / "partial").iterdir()) == []
    return {f.name: f.read_bytes() for d in root.iterdir() if len(d.name) == 2 for f in d.iterdir()}


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ the size limit
def test_the_limit_comes_from_the_environment():
    code = ("from common import limits as constants; from farm.store.blobs import BlobStore; import tempfile; "
            "print(constants.MAX_UPLOAD_BYTES, BlobStore(tempfile.mkdtemp()).max_bytes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "RENDERHIVE_MAX_UPLOAD_BYTES": "12345"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["12345", "12345"]


def test_uploads_over_the_limit_are_413_and_store_nothing(farm):
    keep = put(farm, SCENE_BYTES)
    assert keep.status_code == 201
    big = os.urandom(LIMIT + 1)
    r = put(farm, big)  # announced by Content-Length: refused before a byte is read
    assert r.status_code == 413 and "limit" in r.json()["detail"] and "reduce the scene" in r.json()["detail"]
    r = farm["http"].put(f"/api/blobs/{sha256(big)}", headers=farm["alice"],  # chunked: cut off at the limit
                         content=iter([big[:LIMIT // 2], big[LIMIT // 2:]]))
    assert r.status_code == 413 and "reduce the scene" in r.json()["detail"]
    r = put(farm, b"x" * 10, **{"Content-Length": str(2**70)})  # a lie far beyond any integer column
    assert r.status_code == 413
    r = put(farm, b"x" * 10, **{"Content-Length": "ten bytes"})
    assert r.status_code == 400 and "Content-Length" in r.json()["detail"]
    exact = os.urandom(LIMIT)
    assert put(farm, exact).status_code == 201, "exactly the limit is fine"
    assert stored(farm) == {sha256(SCENE_BYTES): SCENE_BYTES, sha256(exact): exact}, "nothing else, nothing lost"
    assert {b.sha256 for b in rows(farm["engine"], Blob)} == {sha256(SCENE_BYTES), sha256(exact)}


def test_wrong_bytes_and_bad_names_are_refused_and_store_nothing(farm):
    r = put(farm, b"the real scene", sha=sha256(b"another scene"))
    assert r.status_code == 422 and "send it again" in r.json()["detail"]
    for name in ("..%2F..%2Fetc%2Fpasswd", "..", "%2e%2e", "A" * 64, sha256(b"x")[:63], sha256(b"x") + "%0A",
                 "%00" * 64, sha256(b"x") + "%2F..", "ab%2F" + "c" * 61):
        r = farm["http"].put(f"/api/blobs/{name}", content=b"x", headers=farm["alice"])
        assert r.status_code in (404, 405, 422), (name, r.status_code)
        if r.status_code == 422:
            assert "sha256" in r.json()["detail"], r.text
    r = farm["http"].post("/api/blobs/missing", json={"hashes": ["../../farm.db"]}, headers=farm["alice"])
    assert r.status_code == 422 and "64 lowercase hex" in r.json()["detail"]
    assert stored(farm) == {} and rows(farm["engine"], Blob) == []
    assert files_under(farm["root"]) <= {"farm/farm.db", "farm/farm.db-wal", "farm/farm.db-shm"}


# ------------------------------------------------------------------ bombs
def compressed(kind: str, head: bytes, size: int) -> bytes:
    """``head`` then ``size`` zero bytes, zstd- (as Blender compresses) or gzip-compressed to a few KB."""
    out = io.BytesIO()
    with (zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) if kind == "zstd"
          else gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9)) as w:
        w.write(head)
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            w.write(block)
    return out.getvalue()


def zip_bomb(size: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("scene.blend", "w", force_zip64=True) as f:
            f.write(b"BLENDER-v405")
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
    return out.getvalue()


BOMB = 64 * 1024 * 1024  # 64 MiB inside; a real bomb would say 64 GiB, but making one takes minutes


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_compressed_bombs_are_stored_as_is_and_never_expanded(farm, kind):
    """A compressed .blend is what Blender writes: it is stored as sent and submitted after a look at its
    first decompressed bytes; only the worker's Blender ever opens it (and its memory is capped there)."""
    bomb, bad, encoded = (compressed(kind, head, BOMB) for head in (b"BLENDER-v405", b"not a blend", b"BLENDER-v4"))
    assert len(bomb) < LIMIT and len(bad) < LIMIT
    tracemalloc.start()
    try:
        assert put(farm, bomb).status_code == 201
        assert put(farm, bad).status_code == 201
        # Content-Encoding is not undone either: the body is the blob
        assert put(farm, encoded, **{"Content-Encoding": "gzip"}).status_code == 201
        ok = submit(farm, sha256(bomb))
        refused = submit(farm, sha256(bad))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak} bytes allocated: something expanded the bomb"
    assert ok.status_code == 201, ok.text
    assert refused.status_code == 400
    assert "compressed, but not a compressed .blend" in refused.json()["detail"]
    assert "save it from Blender" in refused.json()["detail"]
    assert stored(farm)[sha256(bomb)] == bomb, "stored byte for byte, still compressed"
    assert stored(farm)[sha256(encoded)] == encoded
    assert len(rows(farm["engine"], Job)) == 1


def test_a_zip_is_not_a_blend_even_with_a_blend_inside(farm):
    bomb = zip_bomb(BOMB)
    assert put(farm, bomb).status_code == 201
    r = submit(farm, sha256(bomb))
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "not a .blend" in detail and "save it from Blender" in detail and "not an archive" in detail
    assert rows(farm["engine"], Job) == [] and rows(farm["engine"], Task) == []


# ------------------------------------------------------------------ scenes that are not .blend files
NOT_BLENDS = {
    "empty": b"",
    "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
    "text": b"this is my scene, trust me",
    "almost": b"BLENDE",
    "lowercase": b"blender-v405" + bytes(100),
    "exr": b"\x76\x2f\x31\x01" + bytes(100),
    "7z": b"7z\xbc\xaf\x27\x1c" + bytes(100),
    "gzip of text": gzip.compress(b"hello " * 100),
    "zstd of a png": zstandard.ZstdCompressor().compress(b"\x89PNG\r\n\x1a\n" + bytes(1000)),
    "damaged zstd": b"\x28\xb5\x2f\xfd" + bytes(range(200)),
    "damaged gzip": b"\x1f\x8b\x08\x00" + bytes(range(200)),
    "truncated zstd": zstandard.ZstdCompressor().compress(SCENE_BYTES)[:6],
}


@pytest.mark.parametrize("name", list(NOT_BLENDS))
def test_a_scene_that_is_not_a_blend_is_400_and_says_what_to_do(farm, name):
    data = NOT_BLENDS[name]
    assert put(farm, data).status_code == 201, "any bytes may be stored: the check is at submit"
    r = submit(farm, sha256(data))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "the scene is not a .blend file" in detail and "save it from Blender" in detail, detail
    assert rows(farm["engine"], Job) == [] and rows(farm["engine"], Task) == []


@pytest.mark.parametrize("kind", ["plain", "zstd", "gzip"])
def test_real_blend_headers_pass(farm, kind):
    data = {"plain": SCENE_BYTES, "zstd": zstandard.ZstdCompressor().compress(SCENE_BYTES),
            "gzip": gzip.compress(SCENE_BYTES)}[kind]
    assert put(farm, data).status_code == 201
    assert submit(farm, sha256(data)).status_code == 201


def test_the_sample_scene_passes(farm, tmp_path):
    data = (REPO / "sample_scenes" / "turntable.blend").read_bytes()
    engine, blobs = make_engine_and_store(tmp_path / "big")
    _, token = make_user(engine, "bob")
    with TestClient(create_app(engine, blobs)) as http:
        assert http.put(f"/api/blobs/{sha256(data)}", content=data, headers=bearer(token)).status_code == 201
        r = http.post("/api/jobs", json={"scene_sha256": sha256(data), "frames": "1"}, headers=bearer(token))
        assert r.status_code == 201, r.text


# ------------------------------------------------------------------ path traversal in names
TRAVERSALS = ["../../../../etc/passwd", "..\\..\\windows\\system32", "/etc/passwd", "frame_0001.png/../../x",
              "%2e%2e%2f%2e%2e%2fetc", "a\x00b", "C:\\boot.ini", "~/.ssh/id_rsa", "-rf", "$(touch pwned)"]


def test_traversal_in_job_and_scene_names_is_only_text(farm):
    scene = put(farm, SCENE_BYTES).json()["sha256"]
    before = files_under(farm["root"])
    for i, name in enumerate(TRAVERSALS):
        r = submit(farm, scene, name=name, scene_name=name, client_key=f"k{i}")
        assert r.status_code == 201, r.text
        assert r.json()["name"] == name and r.json()["spec"]["scene_name"] == name
    assert len(rows(farm["engine"], Job)) == len(TRAVERSALS)
    new = files_under(farm["root"]) - before
    assert new <= {"farm/farm.db-wal", "farm/farm.db-shm"}, f"a name became a file: {new}"


def test_traversal_in_model_names_and_worker_ids_is_a_clear_4xx(farm):
    http = farm["http"]
    for name in TRAVERSALS:
        r = http.post("/api/jobs/diffusion", json={"model": name, "prompts": ["a cat"]}, headers=farm["alice"])
        assert r.status_code == 400 and "no worker has model" in r.json()["detail"], r.text
        assert "farm worker --models" in r.json()["detail"], "it says how to add a model"
    for wid in ("..", "..%2F..%2Fetc", "%2e%2e"):
        r = http.get(f"/api/workers/{wid}/reputation", headers=farm["alice"])
        assert r.status_code == 404, (wid, r.text)
    assert rows(farm["engine"], Job) == []


@pytest.fixture
def rendered(farm):
    """A job of 2 frames rendered through the real Coordinator (RESULT with uploaded outputs), approved."""
    engine, blobs, http = farm["engine"], farm["blobs"], farm["http"]
    scene = put(farm, SCENE_BYTES).json()["sha256"]
    job_id = submit(farm, scene, frames="1-2").json()["id"]
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"w1", slots=2)
    tasks = of(d.send((b"w1", P.Ready(2))), P.Task)
    return {**farm, "job": job_id, "driver": d, "tasks": tasks}


def test_traversal_in_result_output_names_is_refused(rendered):
    """Output names are the coordinator's (frame_0001.png): a RESULT must name exactly those."""
    d, blobs, engine = rendered["driver"], rendered["blobs"], rendered["engine"]
    t1, t2 = rendered["tasks"]
    good = output_blob(blobs, t1.spec["frames"][0])
    [err] = of(d.send((b"w1", P.Result(t1.task_id, t1.attempt, [{**good, "name": "a\x00b"}], 1.0))), P.Error)
    assert "NUL" in err.reason, "refused by the protocol before any handler"
    evil = [{**good, "name": name} for name in TRAVERSALS if "\x00" not in name]
    [ack] = of(d.send((b"w1", P.Result(t1.task_id, t1.attempt, evil, 1.0))), P.Ack)
    assert not ack.accepted and "the task asked for ['frame_0001.png']" in ack.reason
    name = t2.spec["outputs"][0]  # the right name, with a path for a hash
    [ack] = of(d.send((b"w1", P.Result(t2.task_id, t2.attempt, [{**good, "name": name, "sha256": "../../farm.db"}],
                                       1.0))), P.Ack)
    assert not ack.accepted and "sha256" in ack.reason
    assert rows(engine, Output) == []
    assert files_under(rendered["root"]) - {"farm/farm.db", "farm/farm.db-wal", "farm/farm.db-shm"} <= \
        {f"farm/blobs/{h[:2]}/{h}" for h in (good["sha256"], sha256(SCENE_BYTES))}


def test_download_names_cannot_escape(rendered):
    http, d, blobs, job = rendered["http"], rendered["driver"], rendered["blobs"], rendered["job"]
    frames = {}
    for t in rendered["tasks"]:
        outs = [output_blob(blobs, f, "dl") for f in t.spec["frames"]]
        frames.update({o["name"]: blobs.read(o["sha256"], 0, o["size"]) for o in outs})
        assert of(d.send((b"w1", P.Result(t.task_id, t.attempt, outs, 1.0))), P.Ack)[0].accepted
    alice = rendered["alice"]
    assert http.post(f"/api/jobs/{job}/approve", headers=alice).status_code == 200
    for name in ("..%2F..%2Ffarm.db", "%2e%2e", "%2e%2e%2ffarm.db", "frame_0001.png%2F..%2F..%2Ffarm.db",
                 "frame_0001.png%00", "..%5C..%5Cfarm.db", "%2Fetc%2Fpasswd"):
        r = http.get(f"/api/jobs/{job}/outputs/{name}", headers=alice)
        assert r.status_code in (404, 405), (name, r.status_code)
        assert b"SQLite" not in r.content and b"root:" not in r.content
    for name, data in frames.items():
        r = http.get(f"/api/jobs/{job}/outputs/{name}", headers=alice)
        assert r.status_code == 200 and r.content == data
        cd = r.headers["content-disposition"]
        assert cd == f'attachment; filename="{name}"', cd
    listing = http.get(f"/api/jobs/{job}/outputs", headers=alice).json()
    assert sorted(o["name"] for o in listing) == sorted(frames) and all("/" not in o["name"] for o in listing)
    assert json.dumps(listing).count("..") == 0


# ------------------------------------------------------------------ values a database refuses
def test_nul_characters_and_huge_ids_are_4xx_on_every_backend(db_url, tmp_path):
    """PostgreSQL text refuses NUL characters and its integers stop at 64 bits; SQLite takes NULs but
    overflows on huge integers. Either way the answer is a 4xx that says what to remove, never a 500."""
    engine, blobs = make_engine_and_store(tmp_path / "farm", url=db_url)
    _, token = make_user(engine, "alice")
    alice = bearer(token)
    with TestClient(create_app(engine, blobs), raise_server_exceptions=False) as http:
        scene = http.put(f"/api/blobs/{sha256(SCENE_BYTES)}", content=SCENE_BYTES, headers=alice).json()["sha256"]
        for extra in ({"name": "shot\x0010"}, {"client_key": "k\x00"}, {"scene_name": "s\x00"}):
            r = http.post("/api/jobs", json={"scene_sha256": scene, "frames": "1", **extra}, headers=alice)
            assert r.status_code in (201, 422), (extra, r.status_code, r.text)
            if r.status_code == 422:
                assert "NUL" in r.json()["detail"], r.text
        for path, ok in [("/api/jobs?status=queued%00", (200, 422)), ("/api/workers/w%00/reputation", (404, 422)),
                         (f"/api/jobs/{2**63}", (404,)), (f"/api/jobs/{2**64}/outputs", (404,)),
                         ("/api/jobs/-1", (404,)), (f"/api/jobs/{2**63}/payment", (404,))]:
            r = http.get(path, headers=alice)
            assert r.status_code in ok, (path, r.status_code, r.text)
        r = http.post("/api/users", json={"name": "eve\x00"}, headers=alice)
        assert r.status_code == 403, "not the admin: refused before the name is looked at"
    engine.dispose()


def test_output_hashes_are_released_with_the_outputs(rendered):
    """Before approval the API names a job's outputs but not their content hashes (a hash is what a
    worker plane would be asked for); approving releases both the files and their hashes."""
    http, d, blobs, job = rendered["http"], rendered["driver"], rendered["blobs"], rendered["job"]
    for t in rendered["tasks"]:
        outs = [output_blob(blobs, f, "hash") for f in t.spec["frames"]]
        assert of(d.send((b"w1", P.Result(t.task_id, t.attempt, outs, 1.0))), P.Ack)[0].accepted
    alice = rendered["alice"]
    before = http.get(f"/api/jobs/{job}/outputs", headers=alice).json()
    assert before and all("sha256" not in o and o["name"] for o in before), before
    assert http.post(f"/api/jobs/{job}/approve", headers=alice).status_code == 200
    after = http.get(f"/api/jobs/{job}/outputs", headers=alice).json()
    assert [o["name"] for o in after] == [o["name"] for o in before]
    assert all(blobs.has(o["sha256"]) for o in after)
