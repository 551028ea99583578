"""Project jobs on the creator plane: a manifest is accepted only when every path stays inside the tree
and every blob is uploaded; each hostile manifest is a clear 4xx that stores nothing (no blob, no job)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from common import manifest as M
from farm.store.models import Blob, Job, Task
from farm.web.app import create_app
from tests.fixtures_inproc import SCENE_BYTES, make_engine_and_store, make_user, sha256


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def farm(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    _, admin = make_user(engine, "admin", admin=True)
    with TestClient(create_app(engine, blobs, broker=None)) as http:
        alice = http.post("/api/users", json={"name": "alice"}, headers=bearer(admin)).json()["token"]
        yield {"engine": engine, "blobs": blobs, "http": http, "alice": bearer(alice)}


def put(farm, data: bytes) -> str:
    sha = sha256(data)
    r = farm["http"].put(f"/api/blobs/{sha}", content=data, headers=farm["alice"])
    assert r.status_code == 201, r.text
    return sha


def project(farm) -> dict:
    scene, tex = put(farm, SCENE_BYTES), put(farm, b"\x89PNG texture bytes")
    return {"scene": "shots/s.blend", "files": [{"path": "shots/s.blend", "sha256": scene},
                                                 {"path": "tex/a.png", "sha256": tex}]}


def stored(farm) -> tuple[int, int]:
    with Session(farm["engine"]) as s:
        return len(s.exec(select(Job)).all()), len(s.exec(select(Blob)).all())


def submit(farm, man, **extra):
    return farm["http"].post("/api/jobs", json={"project": man, "frames": "1-2", **extra}, headers=farm["alice"])


def test_a_project_job_names_its_scene_and_manifest_in_its_tasks_inputs(farm):
    man = project(farm)
    r = submit(farm, man, missing=[{"path": "//tex/gone.png", "used_by": "image 'gone.png'", "blend": "shots/s.blend"}])
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["project"]["scene"] == "shots/s.blend" and spec["project"]["files"] == 2
    assert spec["missing"][0]["path"] == "//tex/gone.png"
    msha = spec["project"]["manifest_sha256"]
    assert M.loads(farm["blobs"].path(msha).read_bytes()).files == {f["path"]: f["sha256"] for f in man["files"]}
    with Session(farm["engine"]) as s:
        tasks = s.exec(select(Task)).all()
    assert len(tasks) == 2
    for t in tasks:
        assert t.inputs == [man["files"][0]["sha256"], msha], "the scene and the manifest, which names the rest"
        assert t.spec["project"] == {"manifest_sha256": msha, "scene": "shots/s.blend"}


@pytest.mark.parametrize("mutate, status, words", [
    (lambda m: m["files"].append({"path": "../../etc/passwd", "sha256": m["files"][1]["sha256"]}), 422, "normalized"),
    (lambda m: m["files"].append({"path": "/etc/passwd", "sha256": m["files"][1]["sha256"]}), 422, "absolute"),
    (lambda m: m["files"].append(dict(m["files"][1])), 422, "twice"),
    (lambda m: m["files"].append({"path": "tex/b.png", "sha256": "0" * 64}), 409, "not uploaded"),
    (lambda m: m.update(scene="tex/a.png"), 422, "not a .blend"),
    (lambda m: m.update(scene="elsewhere.blend"), 422, "not one of"),
    (lambda m: m["files"].append({"path": "x\x00.png", "sha256": m["files"][1]["sha256"]}), 422, "rename"),
    (lambda m: m["files"].extend({"path": f"t/{i}.png", "sha256": m["files"][1]["sha256"]}
                                 for i in range(M.MAX_PROJECT_FILES)), 422, "more than the"),
])
def test_hostile_manifests_are_refused_and_store_nothing(farm, mutate, status, words):
    man = project(farm)
    before = stored(farm)
    mutate(man)
    r = submit(farm, man)
    assert r.status_code == status and words in r.text, r.text
    assert stored(farm) == before


def test_a_million_entries_is_refused_before_its_body_is_read(farm):
    man = project(farm)
    before = stored(farm)
    body = json.dumps({"frames": "1", "project": {"scene": "s.blend", "files": [
        {"path": f"t/{i}.png", "sha256": "a" * 64} for i in range(10**6)]}})
    r = farm["http"].post("/api/jobs", content=body, headers={**farm["alice"], "Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert stored(farm) == before
    assert submit(farm, man).status_code == 201   # the farm is fine afterwards


def test_a_project_over_the_byte_limit_is_refused(farm, monkeypatch):
    from farm.kinds import projects
    man = project(farm)
    monkeypatch.setattr(projects, "MAX_PROJECT_BYTES", len(SCENE_BYTES))
    before = stored(farm)
    r = submit(farm, man)
    assert r.status_code == 413 and "more than the" in r.text
    assert stored(farm) == before


def test_the_scene_hash_must_be_the_manifests_scene(farm):
    man = project(farm)
    r = submit(farm, man, scene_sha256=man["files"][1]["sha256"])
    assert r.status_code == 422 and "manifest's scene" in r.text


def test_the_job_page_warns_of_the_missing_files_as_written(farm):
    """A job submitted with --allow-missing: its page says so right below the heading, each path as written
    in the .blend (escaped), with the data-block that reads it; a job without missing files says nothing."""
    man = project(farm)
    gone = [{"path": "//tex/gone <1>.png", "used_by": "image 'gone.png'", "blend": "shots/s.blend"}]
    job = submit(farm, man, missing=gone).json()
    plain = submit(farm, man).json()
    http = farm["http"]
    csrf = http.get("/login").text.split('name="csrf" value="')[1].split('"')[0]
    assert http.post("/login", data={"csrf": csrf, "token": farm["alice"]["Authorization"][7:]},
                     follow_redirects=False).status_code == 303
    page = http.get(f"/jobs/{job['id']}").text
    assert "Renders without 1 missing file</h2>" in page and "--allow-missing" in page
    assert "<code>//tex/gone &lt;1&gt;.png</code> read by image &#39;gone.png&#39; in shots/s.blend" in page
    assert page.index('id="missing"') < page.index('id="status"'), "right below the heading"
    assert 'id="missing"' not in http.get(f"/jobs/{plain['id']}").text
