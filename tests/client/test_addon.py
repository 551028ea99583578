"""The Blender add-on (client/blender_addon), driven in bpy module mode against a real farm and worker.

bpy never enters this process (other tests run here): each scenario group runs
tests/helpers/addon_driver.py in its own Python with its own BLENDER_USER_RESOURCES and TMPDIR, and
returns its observations as JSON; the assertions are here. In module mode ``bpy.data.is_dirty`` is
True from the start and never changes (measured with bpy 5.0.1: open, save, edit, undo push), so "the
user's file is unchanged" is checked by its bytes on disk, its path, is_dirty, and a fingerprint of the
session (data-block names, every image's path, source and packed state, render settings).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from client import build_addon
from client.localfarm import free_port
from tests.conftest import PY, REPO, SAMPLE, direct_render, pixels, wait_workers

pytestmark = pytest.mark.slow

DRIVER = REPO / "tests" / "helpers" / "addon_driver.py"
ADDON_SRC = REPO / "client" / "blender_addon"


def drive(scenario: str, scratch: Path, timeout: float = 600, **args) -> dict:
    """Run one scenario group of the driver in a fresh bpy process; return its JSON observations."""
    for d in ("bu", "xc", "tmp"):
        (scratch / d).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(scratch / "bu"), "XDG_CACHE_HOME": str(scratch / "xc"),
           "TMPDIR": str(scratch / "tmp"), "PYTHONUNBUFFERED": "1"}
    env.pop("RENDERHIVE_URL", None)
    env.pop("RENDERHIVE_TOKEN", None)
    res = subprocess.run([PY, str(DRIVER), scenario, json.dumps(args, default=str)], capture_output=True,
                         text=True, env=env, timeout=timeout, cwd=scratch)
    assert res.returncode == 0, f"driver {scenario} failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def addons_dir(tmp_path) -> Path:
    """A scripts/addons-like folder where ``renderhive`` links to the source tree (the developer setup)."""
    d = tmp_path / "addons"
    d.mkdir()
    (d / "renderhive").symlink_to(ADDON_SRC, target_is_directory=True)
    return d


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory) -> Path:
    """The zip `make addon` builds (into a scratch folder, not the shared dist/)."""
    out = tmp_path_factory.mktemp("addon-dist")
    res = subprocess.run(["make", "--no-print-directory", "-s", "addon", f"ADDON_OUT={out}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    zips = list(out.glob("renderhive-*.zip"))
    assert len(zips) == 1, zips
    return zips[0]


def user_blend(tmp_path: Path) -> Path:
    """The user's saved file: a copy of the sample scene in a project folder."""
    d = tmp_path / "project"
    d.mkdir(exist_ok=True)
    return Path(shutil.copy2(SAMPLE, d / "turntable.blend"))


# ------------------------------------------------------------------ manifest and package
def test_manifest_follows_blenders_schema():
    """Fields checked against https://developer.blender.org/docs/features/extensions/schema/1.0.0/."""
    with open(ADDON_SRC / "blender_manifest.toml", "rb") as f:
        m = tomllib.load(f)
    required = {"schema_version": str, "id": str, "version": str, "name": str, "tagline": str,
                "maintainer": str, "type": str, "license": list, "blender_version_min": str}
    optional = {"blender_version_max": str, "website": str, "copyright": list, "permissions": dict,
                "tags": list, "platforms": list, "wheels": list, "build": dict}
    for key, typ in required.items():
        assert isinstance(m.get(key), typ), f"{key} must be a {typ.__name__}"
    assert set(m) <= set(required) | set(optional), f"unknown keys {set(m) - set(required) - set(optional)}"
    assert m["schema_version"] == "1.0.0"
    assert m["id"] == "renderhive" and m["id"].isidentifier() and "__" not in m["id"]
    assert not m["id"].startswith("_") and not m["id"].endswith("_")
    assert all(p.isdigit() for p in m["version"].split(".")) and m["version"].count(".") == 2, "semver X.Y.Z"
    assert m["type"] in {"add-on", "theme"} and m["type"] == "add-on"
    assert m["blender_version_min"] == "4.2.0"
    assert m["license"] == ["SPDX:GPL-3.0-or-later"]
    assert m["name"].strip() and m["maintainer"].strip()

    def terse(text: str) -> None:   # taglines and permission reasons: short, no final punctuation
        assert 0 < len(text) <= 64 and text == text.strip(), text
        assert text[-1].isalnum() or text[-1] in ")]}", f"{text!r} must not end with punctuation"
    terse(m["tagline"])
    assert set(m["permissions"]) == {"network", "files"}
    assert set(m["permissions"]) <= {"files", "network", "clipboard", "camera", "microphone"}
    for reason in m["permissions"].values():
        assert isinstance(reason, str)
        terse(reason)
    _script, tags_file = build_addon.blender_ext_script()
    valid_tags: dict = {}
    exec(tags_file.read_text(), valid_tags)
    assert set(m["tags"]) <= valid_tags["addons"]
    # the legacy-add-on metadata says the same
    tree = ast.parse((ADDON_SRC / "__init__.py").read_text())
    bl_info = next(ast.literal_eval(n.value) for n in tree.body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "bl_info")
    assert ".".join(map(str, bl_info["version"])) == m["version"]
    assert bl_info["blender"] == (4, 2, 0) and bl_info["name"] == m["name"]


def test_blenders_validator_accepts_the_package(tmp_path):
    script, _tags = build_addon.blender_ext_script()
    staged = build_addon.stage(tmp_path / "renderhive")
    res = subprocess.run([PY, str(script), "validate", str(staged)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_make_addon_zip_installs_offline_and_its_operators_work(farm, addon_zip, tmp_path):
    with zipfile.ZipFile(addon_zip) as z:
        names = set(z.namelist())
    assert {"blender_manifest.toml", "__init__.py", "renderhive_api.py", "remote.py", "renderhive_project.py",
            "renderhive_manifest.py", "renderhive_hashing.py"} <= names
    assert "packer.py" not in names, "the add-on ships projects; it packs nothing"
    assert not any("__pycache__" in n for n in names)
    f = farm()
    alice = f.creator("alice")
    res = drive("installed", tmp_path / "run", zip=str(addon_zip), url=f.url, token=alice.token,
                out=str(tmp_path / "frames"), blend=str(user_blend(tmp_path)), tiles="2x2")
    assert res["module"] == "bl_ext.user_default.renderhive" and res["enabled"]
    assert "renderhive_api.py" in res["installed_files"]
    assert res["api_module"] == "bl_ext.user_default.renderhive.renderhive_api", "its own copy of client/api.py"
    assert res["client_imported"] is False
    assert len(res["registered"]["classes"]) == 10 and res["registered"]["scene_prop"]
    assert res["submit"]["error"] == "", res["submit"]
    job = alice.job(res["job_id"])
    assert job["frames_total"] == 2 and job["name"] == "turntable"
    # the custodial deposit may already be mined when the add-on reads the job back (~50 ms on the embedded chain)
    assert job["status"] in ("funding", "queued"), job["status"]
    accepted = set(alice.request("GET", "/openapi.json")["components"]["schemas"]["JobCreate"]["properties"])
    if "tiles" not in accepted:
        assert "does not support tiles" in res["warning"]
    if not accepted & {"min_tier", "min_worker_tier"}:
        assert "does not support a minimum worker tier" in res["warning"]
    if "/api/estimate" in alice.request("GET", "/openapi.json")["paths"]:
        assert res["estimate"]["error"] == "", res["estimate"]
        assert res["estimate_shown"][0].endswith(" tokens") and res["estimate_shown"][2] == "1-2"
    else:
        assert "no price estimate" in res["estimate"]["error"] and res["estimate_shown"][:2] == ["n/a", "n/a"]
    # payments are on: the job waits for its deposit ("funding"), then queues
    follow_jobs = res["follow"].pop("jobs")
    assert res["follow"] == {"first": 0.2, "last": 3.0}
    assert [j for j, _ in follow_jobs] == [res["job_id"]] and follow_jobs[0][1] in ("funding", "queued"), follow_jobs
    assert res["refresh"]["error"] == "" and res["jobs"][0][0] == res["job_id"]
    assert res["jobs"][0][1] in ("funding", "queued"), res["jobs"]
    assert res["draw_calls"] > 30
    assert res["temp_dirs"] == []


# ------------------------------------------------------------------ lifecycle
def test_enable_disable_twice_leaks_nothing(addons_dir, tmp_path):
    res = drive("lifecycle", tmp_path / "run", addons=str(addons_dir))
    assert len(res["rounds"]) == 2
    for r in res["rounds"]:
        assert len(r["registered"]["classes"]) == 10 and r["registered"]["scene_prop"] and r["registered"]["wm_prop"]
        assert r["prefs"] == ["http://127.0.0.1:9", "t0k3n", "/tmp/x"], "AddonPreferences reachable"
        assert r["timer"] is True
        assert r["api_module"] == "renderhive.renderhive_api"
        assert Path(r["api_file"]) == REPO / "client" / "api.py", "from the source tree: client/api.py by path"
        assert r["draw_calls"] > 30, "both panels drew through the checking layout"
        assert r["frames_default"] == "1-250"
        after = r["after"]
        assert after["registered"] == {"classes": [], "in_bpy_types": [], "scene_prop": False, "wm_prop": False}
        assert after["handlers"] == res["before"]["handlers"], "no app handler left behind"
        assert after["timer"] is False and after["threads"] == res["before"]["threads"]
        assert after["enabled"] is False
    assert res["client_imported"] is False


# ------------------------------------------------------------------ submit, render, fetch
def test_submit_renders_on_a_worker_and_fetch_brings_the_frames_back(farm, worker, reference_frames, addons_dir,
                                                                     tmp_path):
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    out = tmp_path / "frames"
    res = drive("submit", tmp_path / "run", addons=str(addons_dir), url=f.url, token=alice.token,
                out=str(out), blend=str(user_blend(tmp_path)), work=str(tmp_path / "work"))

    sample = res["sample"]
    assert sample["submit"]["error"] == "", sample["submit"]
    assert sample["before"] == sample["after"], "the user's file and session are untouched by submitting"
    assert sample["temp_after_submit"] == []
    assert "approve" in sample["early_fetch"]["error"], sample["early_fetch"]  # before approval: no frames
    assert sample["fetch"]["error"] == "", sample["fetch"]
    assert sample["files"] == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]
    assert Path(sample["fetch_dir"]) == out / f"job_{sample['job_id']}"
    for n in (1, 2, 3):
        got = pixels(Path(sample["fetch_dir"]) / f"frame_{n:04d}.png")
        assert got.shape == (48, 64, 4) and np.array_equal(got, pixels(reference_frames[n])), f"frame {n}"
    assert [i["source"] for i in sample["images"]] == ["SEQUENCE"]
    assert Path(sample["images"][0]["filepath"]).name == "frame_0001.png"
    job = alice.job(sample["job_id"])
    assert job["status"] in ("approved", "paid") and job["tasks"]["total"] == 2, "frames 1-3 in chunks of 2"

    ext = res["external"]   # a texture beside the scene's folder: shipped as a project with Project Root above
    assert ext["submit"]["error"] == "" and ext["fetch"]["error"] == "", ext
    assert ext["files"] == ["frame_0002.png"]
    assert ext["before"] == ext["after"]
    assert ext["after"]["images"]["checker"] == ["//../textures/checker.png", "FILE", 0], "still unpacked here"

    linked = res["linked"]   # a linked library: shipped as a file of the project
    assert linked["submit"]["error"] == "" and linked["fetch"]["error"] == "", linked
    assert linked["files"] == ["frame_0004.png"] and linked["before"] == linked["after"]
    assert linked["libraries"] == [["//library.blend", False]], "still linked, not packed, in the session"

    assert res["failing_submit"]["error"] == ""
    err = res["failing_fetch"]["error"]
    assert f"job {res['failing_job_id']} failed" in err and "camera" in err, err

    canceled, threaded = res["canceled"], res["threaded"]   # the modal path, fed timer events
    assert canceled["results"] == [["RUNNING_MODAL"], ["CANCELLED"]], canceled
    assert canceled["reports"] == [["WARNING", "Renderhive: submission canceled: no job was created"]]
    assert canceled["temp_exists"] is False and canceled["busy_after"] is False
    assert threaded["results"] == [["FINISHED"]] and threaded["busy_after"] is False, threaded
    assert threaded["reports"][-1][0] == "INFO" and f"job {threaded['job_id']} queued" in threaded["reports"][-1][1]
    assert {"contacting the farm", "creating the job"} <= set(threaded["statuses"]), threaded["statuses"]
    assert any(s.startswith("hashing the scene") for s in threaded["statuses"])
    assert "tracing the files the scene reads" in threaded["statuses"]
    assert threaded["temp_exists"] is False and threaded["pass_through"] == ["PASS_THROUGH"]
    jobs = {j["id"] for j in alice.jobs()}
    assert jobs == {sample["job_id"], ext["job_id"], linked["job_id"], res["failing_job_id"], threaded["job_id"]}, \
        "the canceled submission created no job"
    assert res["temp_dirs"] == [] and res["client_imported"] is False


def test_the_addon_ships_a_project_as_the_cli_does_without_repacking(farm, worker, addons_dir, tmp_path):
    """A project of tests/helpers/make_project.py submitted from the add-on (the UI path: a runner thread and
    the modal timer): the frames equal Blender's own render of the folder; the scene blob is the scene as
    client/project.py rewrites it (not a packed copy) and each texture is its own blob; a resubmit after
    one texture changed uploads that texture only."""
    from client import project as P
    from common import manifest as M
    from tests.client.test_project import make_project
    scene = make_project(tmp_path / "proj")
    expected = P.build(scene)   # computed before the add-on runs: the resubmit changes tex/a.png
    try:
        want_files, rewritten = dict(expected.manifest.files), list(expected.rewritten)
    finally:
        expected.close()
    ref = direct_render(scene, tmp_path / "ref", [1, 2, 3])
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    out = tmp_path / "frames"
    res = drive("project", tmp_path / "run", addons=str(addons_dir), url=f.url, token=alice.token, out=str(out),
                blend=str(scene))
    first, again = res["first"], res["again"]
    assert first["results"] == [["FINISHED"]], first
    assert first["reports"][-1][1].startswith(f"Renderhive: job {first['job_id']} queued, 3 frames (14 of 14 files "
                                              "uploaded"), first["reports"]
    assert {"tracing the files the scene reads", "asking the farm which files it lacks"} <= set(first["statuses"])
    assert any(s.startswith("uploading") and "MB" in s for s in first["statuses"]), first["statuses"]
    assert res["before"] == res["after"], "the user's file and session are untouched"
    assert Path(res["project_module"]) == REPO / "client" / "project.py", "the CLI's own tracer"

    job = alice.job(first["job_id"])
    assert rewritten == ["scene.blend"], "the scene has an absolute path, made relative in a copy"
    assert job["spec"]["scene_sha256"] == want_files["scene.blend"], "the scene blob is the rewritten scene"
    manifest = M.loads((f.data / "blobs" / job["spec"]["project"]["manifest_sha256"][:2]
                        / job["spec"]["project"]["manifest_sha256"]).read_bytes())
    assert manifest.files == want_files and len(want_files) == 14
    for rel in ("wood.png", "lib/lib.blend", "tex/udim/col.1002.png", "fonts/dejavu.ttf", "tex/a.png"):
        sha = want_files[rel]
        local = (tmp_path / "proj" / rel).read_bytes()   # tex/a.png has the resubmit's extra byte since
        stored = (f.data / "blobs" / sha[:2] / sha).read_bytes()
        assert stored == (local[:-1] if rel == "tex/a.png" else local), f"{rel} is a blob of its own, as is"
    assert alice.missing(list(want_files.values())) == [], "every file is its own blob on the farm"

    assert again["results"] == [["FINISHED"]], again
    assert "(1 of 14 files uploaded" in again["reports"][-1][1], again["reports"]
    tex = tmp_path / "proj" / "tex" / "a.png"
    assert alice.job(again["job_id"])["spec"]["scene_sha256"] == want_files["scene.blend"]
    assert alice.missing([hashlib.sha256(tex.read_bytes()).hexdigest()]) == []

    assert res["fetch"]["error"] == "", res["fetch"]
    for frame, path in ref.items():
        got = pixels(Path(res["fetch_dir"]) / f"frame_{frame:04d}.png")
        assert np.array_equal(got, pixels(path)), f"frame {frame} differs from Blender's own render"
    assert res["temp_dirs"] == [] and res["client_imported"] is False


# ------------------------------------------------------------------ errors
def test_errors_are_clear_and_leave_nothing_behind(farm, addons_dir, tmp_path):
    f = farm()
    alice = f.creator("alice")
    res = drive("errors", tmp_path / "run", addons=str(addons_dir), url=f.url, token=alice.token,
                dead_url=f"http://127.0.0.1:{free_port()}", out=str(tmp_path / "frames"),
                blend=str(user_blend(tmp_path)), work=str(tmp_path / "work"))

    def error(case) -> str:
        call = res[case]["call"] if "call" in res[case] else res[case]
        assert call["result"] == ["ERROR"], (case, call)
        return call["error"]
    assert "save the .blend file first" in error("never_saved")
    assert res["never_saved"]["fingerprint"]["filepath"] == ""
    assert "cannot reach the Renderhive coordinator" in error("unreachable")
    assert "Preferences > Add-ons > Renderhive" in error("unreachable")
    assert "rejected the API token" in error("wrong_token")
    assert "set your API token" in error("no_token")
    assert "online access is off" in error("offline")
    assert "cannot reach" in error("unreachable_refresh")
    assert "job 999999 not found" in error("fetch_unknown")
    assert "no job to fetch" in error("fetch_nothing")
    missing = error("missing_texture")
    assert "image 'checker'" in missing and "do not exist on this machine" in missing
    assert "Find Missing Files" in missing and "Render with Missing Files" in missing
    for case in ("unreachable", "wrong_token", "no_token", "offline", "missing_texture"):
        assert res[case]["temp"] == [], f"{case} left temporary files"
    assert res["before"] == res["after"], "failed submissions did not touch the user's file"
    assert res["last_job_id"] == 0 and alice.jobs() == [], "no job was created"
    assert res["temp_dirs"] == []


def test_check_online_allows_local_farms_only_without_online_access():
    """remote.py is plain Python (no bpy): load it by path and check the online-access rule."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("renderhive_remote_under_test", ADDON_SRC / "remote.py")
    remote = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = remote   # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(remote)
    finally:
        sys.modules.pop(spec.name, None)
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://192.168.1.20:8000", "http://[::1]:80"):
        assert remote.check_online(url, False) is None, url
    assert "online access is off" in remote.check_online("https://farm.example.com", False)
    assert remote.check_online("https://farm.example.com", True) is None
    assert "not an http(s) URL" in remote.check_online("farm:8000", True)
    sys.modules.pop("renderhive_api", None)
