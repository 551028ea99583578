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

The Blender Asset Tracer goes in too (:func:`bat_wheel`), so that the add-on traces a scene in-process in a
fraction of a second instead of starting a child Blender (3-11 s a file, measured in the README): the
installed ``blender-asset-tracer`` distribution (pure Python, GPL-2.0-or-later, which the add-on's
GPL-3.0-or-later may include; its licence file travels in its dist-info) is repacked, offline, into the
``py3-none-any`` wheel it was installed from, and the staged ``blender_manifest.toml`` lists it under
``wheels``, Blender's own way to ship a dependency with an extension. Its only import outside the standard
library on the tracing path is ``zstandard``, optional (for zstd files), which Blender's Python carries;
without BAT (not installed where the add-on is built) the add-on still works and traces with Blender.

Invariants: the source tree is never written to (no generated file appears in ``client/blender_addon``);
the zip lands in the output folder under a temporary name first and is renamed into place, so a
concurrent reader never sees half a zip; every failure exits non-zero with Blender's message.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
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


BAT_DIST = "blender-asset-tracer"
WHEEL_TIME = (2020, 1, 1, 0, 0, 0)
"""The date of every member of the repacked wheel: the same installed files make the same bytes."""
NOT_IN_WHEEL = ("INSTALLER", "REQUESTED", "RECORD", "direct_url.json")
"""dist-info files an installer writes (or that are rewritten here), not part of the wheel."""


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def bat_wheel(into: Path) -> Path | None:
    """Repack the installed blender-asset-tracer into ``into/<name>-<version>-py3-none-any.whl`` (its
    files as RECORD lists them, minus scripts outside the package and installer files; RECORD rewritten).
    None when it is not installed, or not a pure-Python install."""
    try:
        dist = importlib.metadata.distribution(BAT_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    wheel_meta = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_meta or "py3-none-any" not in wheel_meta:
        return None
    members = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("../") or "__pycache__" in rel or rel.endswith(".pyc"):
            continue
        if rel.split("/", 1)[0].endswith(".dist-info") and rel.rsplit("/", 1)[-1] in NOT_IN_WHEEL:
            continue
        members.append((rel, Path(f.locate()).read_bytes()))
    info = next(rel.split("/", 1)[0] for rel, _ in members if rel.split("/", 1)[0].endswith(".dist-info"))
    record = "".join(f"{rel},{_record_hash(data)},{len(data)}\n" for rel, data in members) + f"{info}/RECORD,,\n"
    name = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-py3-none-any.whl"
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(into / name, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in sorted(members) + [(f"{info}/RECORD", record.encode())]:
            z.writestr(zipfile.ZipInfo(rel, WHEEL_TIME), data, zipfile.ZIP_DEFLATED)
    return into / name


def _list_wheels(manifest_path: Path, wheels: list[str]) -> None:
    """Add ``wheels = [...]`` to a staged blender_manifest.toml (top level: before its first table)."""
    text = manifest_path.read_text()
    line = "wheels = [" + ", ".join(f'"{w}"' for w in wheels) + "]\n\n"
    at = text.find("\n[")
    text = text + "\n" + line if at < 0 else text[:at + 1] + line + text[at + 1:]
    manifest_path.write_text(text)
    tomllib.loads(text)   # still a valid TOML file


def stage(dest: Path) -> Path:
    """Copy the add-on source, the bundled client code and BAT's wheel into ``dest`` (created; must not
    exist)."""
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for name, src in BUNDLED.items():
        shutil.copy2(src, dest / name)
    wheel = bat_wheel(dest / "wheels")
    if wheel is not None:
        _list_wheels(dest / "blender_manifest.toml", [f"./wheels/{wheel.name}"])
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
