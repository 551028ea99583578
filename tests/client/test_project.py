"""The creator's side of a project: tracing a real scene's files (BAT and bpy), the manifest, what is
missing, what lies outside the root, and absolute paths rewritten in a copy (the creator's file untouched).

Projects are built with bpy by tests/helpers/make_project.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client import project as P
from common import manifest as M

REPO = Path(__file__).resolve().parents[2]

EXPECTED = {"abs/abs.png", "fonts/dejavu.ttf", "lib/lib.blend", "lib/sub/deep.blend", "lib/sub/deep.png",
            "lib/tex/libtex.png", "scene.blend", "seq/f_0001.png", "seq/f_0002.png", "seq/f_0003.png",
            "tex/a.png", "tex/udim/col.1001.png", "tex/udim/col.1002.png", "wood.png"}


def make_project(root: Path, missing: bool = False, strips: bool = False, python: str | None = None) -> Path:
    """Build a project with bpy (tests/helpers/make_project.py), by this Python or ``python`` (an older bpy)."""
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(root.parent / ".bu"), "XDG_CACHE_HOME": str(root.parent / ".xc")}
    res = subprocess.run([python or sys.executable, str(REPO / "tests" / "helpers" / "make_project.py"), str(root)]
                         + (["--missing"] if missing else []) + (["--strips"] if strips else []),
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return Path(json.loads(res.stdout.strip().splitlines()[-1])["scene"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("proj") / "p")


@pytest.fixture(scope="module")
def built_missing(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("projm") / "p", missing=True)


def test_bat_and_bpy_trace_the_same_files_of_every_kind(built):
    by_bat = {(d.blend.name, d.written, len(d.files)) for d in P.trace_bat(built)}
    by_bpy = {(d.blend.name, d.written, len(d.files)) for d in P.trace_bpy(built)}
    assert by_bat == by_bpy
    assert ("scene.blend", "//tex/udim/col.<UDIM>.png", 2) in by_bat       # a UDIM set: both tiles
    assert ("scene.blend", "//seq/f_0001.png", 3) in by_bat                # a sequence: every frame
    assert ("lib.blend", "//tex/libtex.png", 1) in by_bat                  # a library's own texture
    assert ("deep.blend", "//deep.png", 1) in by_bat                       # a library's library's


def test_the_manifest_holds_every_file_relative_to_the_root(built):
    pr = P.build(built)
    try:
        assert pr.tracer == "bat" and not pr.missing
        assert set(pr.manifest.files) == EXPECTED
        assert pr.manifest.scene == "scene.blend"
        assert all(len(h) == 64 for h in pr.manifest.files.values())
        assert M.loads(pr.manifest.canonical()) == pr.manifest  # what the farm checks, it reads back
    finally:
        pr.close()


def test_absolute_paths_are_rewritten_in_a_copy_and_resolve_in_the_tree(built, tmp_path):
    before = built.read_bytes()
    pr = P.build(built)
    try:
        assert pr.rewritten == ["scene.blend"]
        assert built.read_bytes() == before                   # the creator's file is never written
        copy = pr.files["scene.blend"]
        assert copy != built and pr.manifest.files["scene.blend"] != P._sha(built)
        tree = tmp_path / "tree"                              # the copy, somewhere else, in the tree
        for rel, src in pr.files.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes(src.read_bytes())
        paths = {(d.written, len(d.files)) for d in P.trace_bpy(tree / "scene.blend")}
        assert ("//abs/abs.png", 1) in paths and ("//lib/lib.blend", 1) in paths
        assert not any(os.path.isabs(w) and not w.startswith("//") for w, _ in paths)
    finally:
        pr.close()


def test_a_missing_texture_is_named_as_written_with_its_reader(built_missing):
    pr = P.build(built_missing)
    try:
        assert [(d.written, d.used_by) for d in pr.missing] == [("//tex/gone.png", "image 'gone.png'")]
        msg = str(P.missing_error(pr))
        assert "'//tex/gone.png'" in msg and "image 'gone.png' in scene.blend" in msg and "--allow-missing" in msg
        assert pr.missing_report() == [{"path": "//tex/gone.png", "used_by": "image 'gone.png'", "blend": "scene.blend"}]
    finally:
        pr.close()


def test_files_outside_the_root_are_refused_until_the_root_holds_them(built, tmp_path):
    moved = tmp_path / "shot" / "scene.blend"        # its absolute paths now point outside its folder
    moved.parent.mkdir()
    moved.write_bytes(built.read_bytes())
    with pytest.raises(P.ProjectError, match="outside the project root") as err:
        P.build(moved)
    assert "/abs/abs.png" in str(err.value) and "--project-root" in str(err.value)
    with pytest.raises(P.ProjectError, match="not inside the project root"):
        P.build(built, root=built.parent / "lib")
    pr = P.build(built, root=built.parent.parent)                  # a wider root holds everything
    try:
        assert {p.removeprefix("p/") for p in pr.manifest.files} == EXPECTED
    finally:
        pr.close()


@pytest.fixture(scope="module")
def built_strips(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("edit") / "p", strips=True)


def test_sequencer_strips_are_traced_by_bat_and_bpy_alike(built_strips):
    scene = built_strips
    by_bat = {(d.written, d.used_by, len(d.files)) for d in P.trace_bat(scene)}
    by_bpy = {(d.written, len(d.files)) for d in P.trace_bpy(scene)}
    assert by_bat == {("//strips/still.png", "sequencer strip", 1), ("//strips/s_0001.png", "sequencer strip", 3)}
    assert by_bpy == {(w, n) for w, _, n in by_bat}
    pr = P.build(scene)
    try:
        assert set(pr.manifest.files) == {"scene.blend", "strips/still.png", "strips/s_0001.png",
                                          "strips/s_0002.png", "strips/s_0003.png"}
    finally:
        pr.close()


def test_without_bat_blender_traces_the_project_and_says_so(built_strips):
    """Where BAT cannot be imported (or cannot read the file), the bpy child traces it, with a note."""
    code = ("import sys, json; sys.modules['blender_asset_tracer'] = None\n"
            "from client import project as P\n"
            f"pr = P.build({str(built_strips)!r})\n"
            "print(json.dumps([pr.tracer, pr.tracer_note, sorted(pr.manifest.files)]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    tracer, note, files = json.loads(res.stdout.strip().splitlines()[-1])
    assert tracer == "bpy" and note == "BAT is not installed here; Blender traced it instead"
    assert files == ["scene.blend", "strips/s_0001.png", "strips/s_0002.png", "strips/s_0003.png", "strips/still.png"]
