"""BAT inside the add-on (client/build_addon.py): the extension zip carries blender-asset-tracer as a wheel,
listed in its blender_manifest.toml, so that Blender installs it with the extension and the add-on traces
in-process, as the CLI does, instead of in a child Blender.

Checked without Blender's UI: Blender's own validator accepts the staged package, the built zip holds the
wheel, the wheel is the installed distribution byte for byte (RECORD hashes) with its licence, and the
wheel unpacked alone (as Blender installs a wheel) traces a real project exactly as the installed BAT does,
in a Python that cannot see this environment's site-packages.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from client import build_addon
from client import project as P
from tests.client.test_project import REPO, make_project

pytestmark = pytest.mark.skipif(not importlib.util.find_spec("blender_asset_tracer"),
                                reason="blender-asset-tracer is not installed here")


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    return build_addon.stage(tmp_path_factory.mktemp("stage") / "renderhive")


def wheel_of(staged: Path) -> Path:
    wheels = tomllib.loads((staged / "blender_manifest.toml").read_text())["wheels"]
    assert len(wheels) == 1 and wheels[0].startswith("./wheels/blender_asset_tracer-")
    return staged / wheels[0]


def test_the_staged_extension_lists_bats_wheel_and_blender_accepts_it(staged):
    script, _tags = build_addon.blender_ext_script()
    res = subprocess.run([sys.executable, str(script), "validate", str(staged)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    version = importlib.metadata.version("blender-asset-tracer")
    assert wheel_of(staged).name == f"blender_asset_tracer-{version}-py3-none-any.whl"
    assert not (REPO / "client" / "blender_addon" / "wheels").exists(), "the source tree is never written"


def test_the_wheel_is_the_installed_distribution_with_its_licence(staged):
    with zipfile.ZipFile(wheel_of(staged)) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(z.read(f"{info}/RECORD").decode())))
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                continue
            data = z.read(name)
            want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == want and int(size) == len(data), name
        assert {r[0] for r in rows} == names
        assert "GPL" in z.read(f"{info}/METADATA").decode() and f"{info}/licenses/LICENSE.txt" in names
        assert not any("__pycache__" in n or n.startswith("../") for n in names)
    installed = Path(importlib.util.find_spec("blender_asset_tracer").origin).parent
    with zipfile.ZipFile(wheel_of(staged)) as z:
        assert z.read("blender_asset_tracer/trace/__init__.py") == (installed / "trace" / "__init__.py").read_bytes()
    again = build_addon.bat_wheel(staged.parent / "again")
    assert again.read_bytes() == wheel_of(staged).read_bytes(), "the same install repacks to the same bytes"


def test_the_unpacked_wheel_alone_traces_a_project_as_bat_does(staged, tmp_path):
    scene = make_project(tmp_path / "edit", strips=True)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel_of(staged)) as z:
        z.extractall(site)
    import zstandard  # Blender's own Python carries zstandard (for zstd .blend files): a copy of it alone
    shutil.copytree(Path(zstandard.__file__).parent, tmp_path / "blender-python" / "zstandard")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2], sys.argv[4]]\n"
            "import json, blender_asset_tracer\n"
            "assert blender_asset_tracer.__file__.startswith(sys.argv[1]), blender_asset_tracer.__file__\n"
            "from client import project as P\n"
            "print(json.dumps(sorted([d.written, len(d.files)] for d in P.trace_bat(sys.argv[3]))))")
    # -I -S: no user or site packages, so the only BAT it can import is the unpacked wheel
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(site), str(REPO), str(scene),
                          str(tmp_path / "blender-python")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == sorted([d.written, len(d.files)] for d in P.trace_bat(scene)) and len(got) == 2


def test_the_built_zip_carries_the_wheel(tmp_path):
    zip_path = build_addon.build(tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
    assert manifest["wheels"] == [f"./{n}" for n in names if n.startswith("wheels/") and n.endswith(".whl")]
    assert "renderhive_project.py" in names


def test_blender_installs_the_wheel_with_the_extension(tmp_path):
    """Installing the zip (in a bpy process of its own) installs BAT where the extension's imports find it."""
    zip_path = build_addon.build(tmp_path / "dist")
    code = ("import json, os, sys\n"
            "out = os.fdopen(os.dup(1), 'w'); os.dup2(2, 1)\n"
            "import bpy\n"
            "bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo='user_default', "
            "enable_on_install=True)\n"
            "import importlib.util\n"
            "spec = importlib.util.find_spec('blender_asset_tracer')\n"
            "out.write(json.dumps({'bat': spec.origin if spec else None, 'enabled': 'bl_ext.user_default.renderhive' "
            "in sys.modules}) + '\\n'); out.flush()")
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "bu"), "XDG_CACHE_HOME": str(tmp_path / "xc")}
    res = subprocess.run([sys.executable, "-c", code, str(zip_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["enabled"]
    local = tmp_path / "bu" / "extensions" / ".local"
    assert (local / "lib").is_dir() and any(local.rglob("blender_asset_tracer/trace/__init__.py"))
