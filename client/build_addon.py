"""Build the Renderhive Blender extension zip (``make addon``), offline, without starting Blender.

    python -m client.build_addon [--out dist]      # -> dist/renderhive-<version>.zip

The extension's source is ``client/blender_addon/``. Inside an installed extension the package is
``bl_ext.<repo>.renderhive`` and the ``client`` package of this repository does not exist, so the build
*stages* the source in a temporary folder together with copies of the client code it shares with the CLI
(:data:`BUNDLED`): the standard-library HTTP client ``client/api.py`` as ``renderhive_api.py``, the
project tracer ``client/project.py`` as ``renderhive_project.py`` and the manifest checks it needs
(``common/manifest.py``, ``common/hashing.py``). The add-on imports those bundled copies first, and loads
the originals by path only when it runs straight from the source tree (``remote.py``). The zip is then made by
Blender's own extension builder (``blender_ext.py build``, shipped inside the ``bpy`` wheel), which also
validates the manifest and its tags against Blender's list.

Invariants: the source tree is never written to (no generated file appears in ``client/blender_addon``);
the zip lands in the output folder under a temporary name first and is renamed into place, so a
concurrent reader never sees half a zip; every failure exits non-zero with Blender's message.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parent
SOURCE = CLIENT / "blender_addon"
API_SOURCE = CLIENT / "api.py"
BUNDLED_API = "renderhive_api.py"
"""Name of the bundled copy of client/api.py inside the extension (see remote.py's import)."""
BUNDLED = {BUNDLED_API: API_SOURCE,
           "renderhive_hashing.py": CLIENT.parent / "common" / "hashing.py",
           "renderhive_manifest.py": CLIENT.parent / "common" / "manifest.py",
           "renderhive_project.py": CLIENT / "project.py"}
"""Bundled file name → the repository's source (remote.py's ``SHARED`` lists the same names)."""


def manifest() -> dict:
    with open(SOURCE / "blender_manifest.toml", "rb") as f:
        return tomllib.load(f)


def bpy_root() -> Path:
    """The folder of the installed ``bpy`` package, found without importing it (importing starts Blender)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bpy is not installed in this Python: run `make install` first")
    return Path(list(spec.submodule_search_locations)[0])


def blender_ext_script() -> tuple[Path, Path | None]:
    """Blender's extension command line tool and its list of valid tags (the ones Blender itself uses)."""
    root = bpy_root()
    found = sorted(root.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        raise SystemExit(f"blender_ext.py not found under {root}: is this a bpy >= 4.2 wheel?")
    tags = sorted(root.glob("*/scripts/modules/_bpy_internal/extensions/tags.py"))
    return found[-1], (tags[-1] if tags else None)


def stage(dest: Path) -> Path:
    """Copy the add-on source and the bundled client code into ``dest`` (created; must not exist)."""
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for name, src in BUNDLED.items():
        shutil.copy2(src, dest / name)
    return dest


def build(out_dir: Path) -> Path:
    """Stage and build the extension; return the path of the zip in ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    m = manifest()
    final = out_dir / f"{m['id']}-{m['version']}.zip"
    script, tags = blender_ext_script()
    with tempfile.TemporaryDirectory(prefix="renderhive-addon-build-") as tmp:
        src = stage(Path(tmp) / m["id"])
        partial = Path(tmp) / final.name
        cmd = [sys.executable, str(script), "build", "--source-dir", str(src), "--output-filepath", str(partial)]
        if tags is not None:
            cmd += ["--valid-tags", str(tags)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not partial.is_file():
            raise SystemExit(f"building the extension failed:\n{res.stdout}{res.stderr}")
        tmp_final = final.with_name(final.name + ".part")
        shutil.copy2(partial, tmp_final)
        os.replace(tmp_final, final)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the Renderhive Blender extension zip")
    ap.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist)")
    args = ap.parse_args(argv)
    path = build(args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
