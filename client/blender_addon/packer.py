"""Pack a temporary copy of a .blend in a separate Blender process, so the user's session is never touched.

Run as a script, never imported by the add-on:

    blender --background --factory-startup --disable-autoexec --python packer.py -- COPY.blend REPORT.json
    python packer.py COPY.blend REPORT.json          (bpy installed as a Python module)

The submit operator first writes ``COPY.blend`` with ``save_as_mainfile(copy=True)`` (the open file keeps
its path, its bytes on disk and its dirty state). This child then opens the copy with scripts disabled,
packs linked libraries and every external file Blender can pack (images, fonts, sounds, volumes),
saves the copy in place (zstd-compressed) and writes ``REPORT.json``:
``{"packed": N, "problems": [...]}``. A problem is an external file the farm would refuse: missing on
disk, or of a kind that cannot be packed (image sequences, movies, movie clips, Alembic/USD caches). When
there are problems the copy is not saved again and the add-on stops before uploading anything.

Why a child process: ``bpy.ops.file.pack_all()`` packs into the data of the *open* file. The in-process
alternative (pack_all, save a copy, then ``unpack(method="REMOVE")`` what was packed) measured under 1 ms
and restored the packed state, but it edits the user's data in between (an error half-way leaves their
file packed and larger), and its effect on the dirty flag cannot be checked here: in bpy module mode
``bpy.data.is_dirty`` is True from the start and never changes. A child Blender cannot affect the user's
session at all, and it runs off the main thread. Measured with bpy 5.0.1 on the 115 KB sample: 0.4 s
(0.3 s of it starting bpy); a whole synchronous submit 0.4-0.9 s on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import sys

UNPACKABLE_IMAGES = {"SEQUENCE", "MOVIE"}


def _abspath(bpy, idb) -> str:
    # normpath: the copy lives in a temporary folder, so relative paths look like //../../project/x.png
    return os.path.normpath(bpy.path.abspath(idb.filepath, library=idb.library))


def _used(idb) -> bool:
    return idb.users > int(getattr(idb, "use_fake_user", False))


def problems(bpy) -> list[str]:
    """External files still referenced after packing (what a worker would refuse)."""
    out = []

    def report(what: str, path: str, packable: bool) -> None:
        if not os.path.exists(path):
            out.append(f"{what} uses {path!r}, which does not exist: relink it "
                       "(File > External Data > Find Missing Files) or remove it")
        elif not packable:
            out.append(f"{what} uses {path!r}, a kind of file that cannot be packed: convert it "
                       "(for example an image sequence to single packed images, a cache to baked geometry)")
        else:
            out.append(f"{what} uses {path!r}, which could not be packed")

    for lib in bpy.data.libraries:
        if lib.packed_file is None and not getattr(lib, "is_archive", False):
            report(f"linked library {lib.name!r}", os.path.normpath(bpy.path.abspath(lib.filepath)), True)
    for img in bpy.data.images:
        if img.source not in {"FILE", "SEQUENCE", "TILED", "MOVIE"} or len(img.packed_files) or not _used(img):
            continue
        report(f"image {img.name!r}", _abspath(bpy, img), img.source not in UNPACKABLE_IMAGES)
    for coll, label in ((bpy.data.fonts, "font"), (bpy.data.volumes, "volume")):
        for idb in coll:
            if idb.packed_file is None and idb.filepath and idb.filepath != "<builtin>":
                report(f"{label} {idb.name!r}", _abspath(bpy, idb), True)
    for coll, label in ((bpy.data.cache_files, "cache file"), (bpy.data.movieclips, "movie clip")):
        for idb in coll:
            if _used(idb):
                report(f"{label} {idb.name!r}", _abspath(bpy, idb), False)
    return out


def packed_count(bpy) -> int:
    n = sum(1 for lib in bpy.data.libraries if lib.packed_file is not None)
    n += sum(1 for img in bpy.data.images if len(img.packed_files))
    for coll in (bpy.data.fonts, bpy.data.sounds, bpy.data.volumes):
        n += sum(1 for idb in coll if idb.packed_file is not None)
    return n


def main(argv: list[str]) -> int:
    args = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    if len(args) != 2:
        print("usage: packer.py COPY.blend REPORT.json", file=sys.stderr)
        return 2
    blend, report_path = (os.path.abspath(a) for a in args)
    import bpy

    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.ops.wm.open_mainfile(filepath=blend, use_scripts=False)
    before = packed_count(bpy)
    errors = []
    if any(lib.packed_file is None for lib in bpy.data.libraries):
        try:
            bpy.ops.file.pack_libraries()
        except RuntimeError as exc:  # reported below as problems, with the file names
            errors.append(str(exc))
    try:
        bpy.ops.file.pack_all()
    except RuntimeError as exc:      # a missing file: reported below as a problem
        errors.append(str(exc))
    found = problems(bpy)
    if not found:
        bpy.ops.wm.save_as_mainfile(filepath=blend, compress=True, relative_remap=False)
    with open(report_path + ".part", "w") as f:
        json.dump({"packed": packed_count(bpy) - before, "problems": found, "messages": errors}, f)
    os.replace(report_path + ".part", report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
