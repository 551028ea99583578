"""Manifest checks shared by the coordinator and the worker: each hostile shape is refused with a reason."""
from __future__ import annotations

import json

import pytest

from common import manifest as M

SHA = "a" * 64


def man(*paths: str, scene: str | None = None) -> dict:
    return {"scene": scene or paths[0], "files": [{"path": p, "sha256": SHA} for p in paths]}


def test_a_good_manifest_round_trips():
    m = M.parse(man("shots/a.blend", "tex/a b.png", "Ünïcode/ok.png"))
    assert M.loads(m.canonical()) == m and m.hashes() == [SHA]


@pytest.mark.parametrize("path, why", [
    ("../../etc/passwd", "not normalized"), ("/etc/passwd", "absolute"), ("C:/x.png", "absolute"),
    ("a/./b.png", "not normalized"), ("a//b.png", "not normalized"), ("a/", "not normalized"),
    ("a\\..\\b.png", "rename"), ("a\x00b", "rename"), ("x\n.png", "rename"), (" a.png", "rename"),
    ("a" * 401, "longer than"), ("/".join(["d"] * 33), "folders deep"), ("", "non-empty"),
])
def test_paths_that_could_leave_the_tree_are_refused(path, why):
    with pytest.raises(M.ManifestError, match=why):
        M.parse(man("s.blend", path, scene="s.blend"))


def test_duplicates_file_folder_clashes_and_bad_scenes_are_refused():
    with pytest.raises(M.ManifestError, match="twice"):
        M.parse(man("s.blend", "a.png", "a.png", scene="s.blend"))
    with pytest.raises(M.ManifestError, match="both a file and a folder"):
        M.parse(man("s.blend", "a", "a/b.png", scene="s.blend"))
    with pytest.raises(M.ManifestError, match="not one of"):
        M.parse(man("a.png", scene="s.blend"))
    with pytest.raises(M.ManifestError, match="not a .blend"):
        M.parse(man("a.png"))
    with pytest.raises(M.ManifestError, match="sha256"):
        M.parse({"scene": "s.blend", "files": [{"path": "s.blend", "sha256": "A" * 64}]})
    with pytest.raises(M.ManifestError, match="only"):
        M.parse({**man("s.blend"), "extra": 1})


def test_too_many_files_and_too_big_a_blob_are_refused_before_work():
    with pytest.raises(M.ManifestError, match="more than the"):
        M.parse(man("s.blend", *(f"t{i}.png" for i in range(M.MAX_PROJECT_FILES)), scene="s.blend"))
    with pytest.raises(M.ManifestError, match="bytes, more than"):
        M.loads(b" " * (M.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(M.ManifestError, match="not JSON"):
        M.loads(b"[" * 100000)
    assert len(json.dumps(man("s.blend", *(f"t{i}.png" for i in range(M.MAX_PROJECT_FILES - 1)), scene="s.blend"))) \
        < M.MAX_MANIFEST_BYTES
