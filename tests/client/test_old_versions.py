"""Tracing scenes saved by older Blender versions: BAT against the bpy-child tracer on projects written by
an older bpy module (issue 19 asks for 2.7x to 5.x).

The old files are generated, not checked in: ``RENDERHIVE_OLD_BPY_PYTHON`` names a Python with an older
``bpy`` module (e.g. a throwaway venv: ``python3.11 -m venv /tmp/oldbpy && /tmp/oldbpy/bin/pip install
bpy==4.2.0``), which saves the test projects of tests/helpers/make_project.py (textures, a UDIM set, a
sequence, a font, libraries linking libraries, an absolute path; and a sequencer edit). Skipped when it is
not set. Blender 2.80 files come from the same module: its app templates' startup.blend files are saved by
2.80 (``BLENDER-v280``); they read no files, so they show only that BAT parses that version.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from client import project as P
from tests.client.test_project import EXPECTED, make_project

OLD = os.environ.get("RENDERHIVE_OLD_BPY_PYTHON", "")
pytestmark = pytest.mark.skipif(not (OLD and os.path.isfile(OLD)),
                                reason="set RENDERHIVE_OLD_BPY_PYTHON to a Python with an older bpy module")


def old_version() -> str:
    return subprocess.run([OLD, "-c", "import bpy; print(bpy.app.version_string)"], capture_output=True,
                          text=True, timeout=120).stdout.strip().splitlines()[-1]


def traced(deps) -> set[tuple[str, str, int]]:
    return {(d.blend.name, d.written, len(d.files)) for d in deps}


@pytest.mark.parametrize("strips", [False, True])
def test_bat_reads_an_older_blenders_project_as_blender_does(tmp_path, strips):
    scene = make_project(tmp_path / "p", strips=strips, python=OLD)
    by_bat = traced(P.trace_bat(scene))
    assert by_bat == traced(P.trace_bpy(scene)) == traced(P.trace_bpy(scene, python=OLD)), old_version()
    pr = P.build(scene)
    try:
        assert pr.tracer == "bat" and not pr.missing
        if not strips:
            assert set(pr.manifest.files) == EXPECTED
    finally:
        pr.close()


def test_bat_parses_blender_2_80_files():
    site = Path(subprocess.run([OLD, "-c", "import bpy; print(bpy.utils.resource_path('LOCAL'))"],
                               capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    old = [p for p in site.rglob("startup.blend") if p.read_bytes()[:12] == b"BLENDER-v280"]
    if not old:
        pytest.skip(f"no Blender 2.80 file in {site}")
    for path in old:
        assert P.trace_bat(path) == []   # parsed (a file BAT cannot read raises), and it reads no files
