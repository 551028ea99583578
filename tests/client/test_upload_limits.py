"""A project of many files against the farm's upload rate (farm/web/guard.py): the client waits out 429/503
answers that carry ``Retry-After`` (client/api.py ``Client.patiently``), for whole PUTs, resumable PATCHes
and batches, for a bounded time; and small files go in batches (``POST /api/blobs/batch``,
farm/web/api_blobs.py), one request for up to 100 files.

Real servers only: ``farm submit`` (the CLI in a child process) against a real ``farm serve`` with a low
burst, and the client library against the app served by a real uvicorn in a thread (the ``serve`` fixture of
tests/web/test_resumable_uploads.py). Outcomes are blobs on the farm byte for byte, bytes counted by
progress, and answers' statuses and messages.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from client import project as P
from client.api import ApiError, Client
from tests.client.test_project import REPO
from tests.e2e.test_projects import farm_cli
from tests.web import test_resumable_uploads

serve = test_resumable_uploads.serve   # the fixture: a real uvicorn serving the app, in a thread

pytestmark = pytest.mark.timeout(300)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def many_files(root: Path, n: int) -> Path:
    """A real project of ``n`` small textures (tests/helpers/make_project.py --many), built with bpy."""
    import subprocess
    import sys
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(root.parent / ".bu"), "XDG_CACHE_HOME": str(root.parent / ".xc")}
    res = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "make_project.py"), str(root), "--many",
                          str(n)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return Path(json.loads(res.stdout.strip().splitlines()[-1])["scene"])


def on_farm(client: Client, root: Path) -> int:
    """How many of the project's files the farm lacks (0: all there)."""
    hashes = [sha(p.read_bytes()) for p in root.rglob("*") if p.is_file()]
    return len(client.missing(hashes))


def test_farm_submit_of_many_files_waits_out_the_rate_or_sends_batches(farm, tmp_path, monkeypatch):
    scene = many_files(tmp_path / "proj", 20)
    f = farm(env={"RENDERHIVE_UPLOAD_BURST": "5", "RENDERHIVE_UPLOADS_PER_MINUTE": "120"})
    alice = f.creator("alice")
    monkeypatch.setenv("RENDERHIVE_BATCH_BELOW_KIB", "0")   # one PUT a file: 21 PUTs, a burst of 5, 2 a second
    t0 = time.monotonic()
    one_by_one = farm_cli(f, alice, "submit", str(scene), "--frames", "1")
    took = time.monotonic() - t0
    monkeypatch.delenv("RENDERHIVE_BATCH_BELOW_KIB")
    assert one_by_one.returncode == 0, one_by_one.stdout + one_by_one.stderr
    m = re.search(r"waited (\d+) s in all for the farm's upload limit \((\d+) upload requests\)", one_by_one.stderr)
    assert m, one_by_one.stderr
    assert int(m.group(2)) == 21 and int(m.group(1)) >= 1   # 16 over the burst take 8 s or more: waits
    assert 8 <= took < 120
    assert on_farm(alice, tmp_path / "proj") == 0
    assert len(alice.jobs()) == 1

    # the same project with one texture changed: batched (the default), sent at once
    (tmp_path / "proj" / "many" / "t_0003.png").write_bytes((tmp_path / "proj" / "many" / "t_0003.png").read_bytes()
                                                            + b"\0")
    again = farm_cli(f, alice, "submit", str(scene), "--frames", "1", "--json")
    assert again.returncode == 0, again.stderr
    assert on_farm(alice, tmp_path / "proj") == 0


def test_many_small_files_go_in_batches_of_at_most_100(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "3")
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "600")
    farm = serve()
    scene = many_files(tmp_path / "proj", 250)
    pr = P.build(scene)
    client = Client(farm["url"], farm["alice"])
    seen: list[str] = []
    client.on_wait = seen.append
    got: dict[str, int] = {}
    stats = P.upload(client, pr, lambda name, n: got.__setitem__(name, got.get(name, 0) + n))
    assert stats["blobs_sent"] == 251 and stats["requests"] == 3 and stats["bytes_sent"] == pr.total_bytes
    assert sum(got.values()) == pr.total_bytes and len(got) == 251
    assert seen == [] and stats["waited_s"] == 0   # 3 requests: within the burst
    for rel, h in pr.manifest.files.items():
        assert farm["blobs"].path(h).read_bytes() == (tmp_path / "proj" / rel).read_bytes()
    assert P.upload(client, pr)["blobs_sent"] == 0   # a resubmit sends nothing


def test_puts_and_resumable_pieces_wait_out_429_and_count_each_byte_once(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "1")
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "60")   # a token a second
    farm = serve()
    client = Client(farm["url"], farm["alice"])
    seen: list[str] = []
    client.on_wait = seen.append
    files = []
    for i, size in enumerate((3_000_000, 3_000_000, 200_000)):   # bodies bigger than a socket buffer
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(os.urandom(size))
        files.append(path)
    counted = []
    for path in files[:2]:   # the second PUT is refused before its body is read, then sent again
        n = [0]
        client.upload_blob(path, sha(path.read_bytes()), lambda k, n=n: n.__setitem__(0, n[0] + k))
        counted.append(n[0])
    n = [0]
    client.upload_resumable(files[2], sha(files[2].read_bytes()), lambda k: n.__setitem__(0, n[0] + k))
    counted.append(n[0])
    assert counted == [p.stat().st_size for p in files]
    for path in files:
        assert farm["blobs"].path(sha(path.read_bytes())).read_bytes() == path.read_bytes()
    assert seen and all(m == "waiting 1 s for the farm's upload limit" for m in seen)
    assert client.waited >= 2


def test_the_wait_is_bounded_and_says_what_to_do(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "1")
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "0.6")   # a token every 100 s
    farm = serve()
    client = Client(farm["url"], farm["alice"], wait_limit=5)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 1000)
    client.upload_blob(a, sha(a.read_bytes()))
    t0 = time.monotonic()
    with pytest.raises(ApiError) as exc:
        client.upload_blob(b, sha(b.read_bytes()))
    assert time.monotonic() - t0 < 5, "a Retry-After beyond the limit is not slept"
    assert exc.value.status == 429 and exc.value.retry_after == 100
    assert "gave up after waiting 0 s" in str(exc.value) and "RENDERHIVE_WAIT_LIMIT_S" in str(exc.value)
    assert not farm["blobs"].has(sha(b.read_bytes()))


def batch_body(entries: list[tuple[str, int]], data: bytes) -> bytes:
    return json.dumps({"blobs": [list(e) for e in entries]}).encode() + b"\n" + data


def test_a_bad_batch_stores_nothing_and_says_why(serve, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "20")
    farm = serve()
    x, y = b"x" * 100, b"y" * 50
    h = httpx.Client(base_url=farm["url"], timeout=30, headers={"Authorization": f"Bearer {farm['alice']}"})
    with h:
        def post(body: bytes) -> httpx.Response:
            return h.post("/api/blobs/batch", content=body)
        cases = [
            (batch_body([(sha(x), 100), (sha(b"z" * 50), 50)], x + y), 422, "blob 1 of the batch hashes to"),
            (batch_body([(sha(x), 100), (sha(y), 40)], x + y), 422, "add up to 140 bytes but 150 bytes follow"),
            (batch_body([(sha(b"")[:10], 0)], b""), 422, "blob 0 of the batch"),
            (b"no newline", 422, "starts with one JSON line"),
            (b'{"blobs": 3}\n', 422, "is not {\"blobs\""),
            (batch_body([(sha(b""), 0)] * 101, b""), 422, "1 to 100 blobs, not 101"),
            (batch_body([(sha(x), 5_000_000)], b"\0" * 5_000_000), 413, "limit"),
        ]
        for body, status, words in cases:
            r = post(body)
            assert r.status_code == status and words in r.json()["detail"], (r.status_code, r.text)
        assert not farm["blobs"].has(sha(x)) and not farm["blobs"].has(sha(y))
        r = post(batch_body([(sha(x), 100), (sha(y), 50)], x + y))
        assert r.status_code == 201 and r.json() == {"stored": [sha(x), sha(y)], "had": 0, "bytes": 150}
        assert farm["blobs"].path(sha(y)).read_bytes() == y
        assert post(batch_body([(sha(x), 100)], x)).json() == {"stored": [], "had": 1, "bytes": 0}
    anonymous = httpx.post(f"{farm['url']}/api/blobs/batch", content=batch_body([(sha(b"q"), 1)], b"q"))
    assert anonymous.status_code == 401


def test_a_batch_counts_against_the_upload_rate(serve, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "2")
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "1")
    farm = serve()
    with httpx.Client(base_url=farm["url"], timeout=30, headers={"Authorization": f"Bearer {farm['alice']}"}) as h:
        codes = [h.post("/api/blobs/batch", content=batch_body([(sha(bytes([i])), 1)], bytes([i]))).status_code
                 for i in range(3)]
        assert codes == [201, 201, 429]
        assert not farm["blobs"].has(sha(bytes([2])))


def test_a_project_over_the_file_limit_is_refused_with_advice_not_a_traceback(tmp_path, monkeypatch):
    from common import manifest as M
    scene = many_files(tmp_path / "proj", 6)
    monkeypatch.setattr(M, "MAX_PROJECT_FILES", 5)
    with pytest.raises(P.ProjectError, match="7 files, more than the 5 a job may ship: pack small textures"):
        P.build(scene)


def addon_remote():
    """The add-on's network side (client/blender_addon/remote.py never imports bpy), loaded from the source
    tree with its own copies of client/api.py and client/project.py, as it runs inside Blender."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("renderhive_remote_test",
                                                  REPO / "client" / "blender_addon" / "remote.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_addon_shows_the_wait_and_esc_ends_it(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("RENDERHIVE_UPLOAD_BURST", "2")
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "120")
    farm = serve()
    scene = many_files(tmp_path / "proj", 6)
    remote = addon_remote()
    monkeypatch.setattr(remote.api.Client, "batch_below", 0)   # one PUT a file, to meet the limit
    conn = remote.Connection(farm["url"], farm["alice"])
    msgs: list = []
    remote.submit(remote.SubmitRequest(conn, str(scene), {"frames": "1", "scene_name": "scene.blend"}),
                  msgs.append, lambda: False)
    assert isinstance(msgs[-1], remote.Submitted), msgs[-1]
    waits = [m.text for m in msgs if isinstance(m, remote.Progress) and m.text.startswith("waiting")]
    assert waits and all(t == "waiting 1 s for the farm's upload limit" for t in waits)
    assert on_farm(Client(farm["url"], farm["alice"]), tmp_path / "proj") == 0

    # a second user at a token every 100 s: Esc during the wait cancels at once, and no job is made
    monkeypatch.setenv("RENDERHIVE_UPLOADS_PER_MINUTE", "0.6")
    farm = serve()
    conn = remote.Connection(farm["url"], farm["alice"])
    msgs, t0 = [], time.monotonic()
    waiting = lambda: any(isinstance(m, remote.Progress) and m.text.startswith("waiting") for m in msgs)  # noqa: E731
    remote.run_guarded(remote.submit, remote.SubmitRequest(conn, str(scene), {"frames": "1",
                                                                             "scene_name": "scene.blend"}),
                       msgs.append, waiting)
    assert isinstance(msgs[-1], remote.Canceled) and time.monotonic() - t0 < 60, msgs[-1]
    assert msgs[-1].message == "submission canceled: no job was created"
    assert "waiting 100 s for the farm's upload limit" in [m.text for m in msgs if isinstance(m, remote.Progress)]
    assert Client(farm["url"], farm["alice"]).jobs() == []
