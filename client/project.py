"""A scene's project on the creator's machine: every file it needs, traced, checked and hashed.

Used by ``farm submit`` and the Blender add-on (one implementation). :func:`build` traces the scene with
the Blender Asset Tracer (BAT, ``blender-asset-tracer``: pure Python, reads the file's own DNA, no Blender
needed), or with bpy in a child process when BAT cannot read the file (:func:`trace_bpy`); it then

* follows every linked library and traces it **whole** (BAT's expansion from a 5.0 scene stops at the
  library's collections and misses the textures the library reads: measured, see tests/client);
* lists what is **missing** (with the path as written in the .blend and the data-block that reads it) and
  what lies **outside the project root** (never shipped: the creator picks a wider ``--project-root``);
* rewrites **absolute** paths inside the root to ``//relative`` ones in a temporary copy of the .blend that
  holds them (BAT's own rewriting; the creator's file is never touched), so the worker opens the same tree;
* hashes every file: the manifest maps path relative to the root → sha256 (:mod:`common.manifest`).

Nothing is uploaded here; :func:`upload` sends only the blobs the farm lacks (resumably when they are big).

Standard library plus ``common.manifest`` and, when installed, BAT: ``make addon`` bundles this file as
``renderhive_project.py`` with ``common/manifest.py`` as ``renderhive_manifest.py`` (and its hashing checks),
so that the Blender add-on traces and ships projects with this very code.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __name__.endswith("renderhive_project"):   # the add-on's bundled copy: remote.py loaded its dependency first
    _dep = sys.modules[__name__.replace("renderhive_project", "renderhive_manifest")]
    Manifest, ManifestError, check_path, parse = _dep.Manifest, _dep.ManifestError, _dep.check_path, _dep.parse
else:
    from common.manifest import Manifest, ManifestError, check_path, parse

ID_NAMES = {"IM": "image", "LI": "library", "VF": "font", "SO": "sound", "VO": "volume", "CF": "cache file",
            "MC": "movie clip", "NT": "node group", "MA": "material", "SC": "scene", "OB": "object",
            "ME": "mesh", "TE": "texture"}


class ProjectError(RuntimeError):
    """The project cannot be shipped as it is; the message lists what to fix."""


@dataclass
class Dependency:
    """One path a .blend reads: as written, where it is written, who reads it, and what it resolves to."""
    blend: Path            # the .blend file that holds the path (the scene or a library)
    written: str           # the path as written there ("//tex/a.png", "/abs/x.png", "//seq/f_0001.png")
    used_by: str           # "image 'a.png'"
    files: list[Path]      # the files it resolves to (a sequence or UDIM set: each), [] when missing
    absolute: bool
    field_rewrite: object = None  # BAT usage, to rewrite an absolute path (None from the bpy tracer)

    def describe(self, root: Path) -> str:
        where = _rel_or_abs(self.blend, root)
        return f"{self.used_by} in {where} reads {self.written!r}"


@dataclass
class Project:
    root: Path
    scene: str                                   # relative path of the scene in the project
    files: dict[str, Path]                       # relative path → local file to upload (maybe a rewritten copy)
    manifest: Manifest
    sizes: dict[str, int]
    missing: list[Dependency] = field(default_factory=list)
    outside: list[Dependency] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)  # .blend files whose absolute paths were made relative
    tracer: str = "bat"
    tracer_note: str = ""                        # why the bpy tracer read it, when BAT did not
    seconds: float = 0.0
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def missing_report(self) -> list[dict[str, str]]:
        """What the job page shows for ``--allow-missing``: each missing path as written, and its reader."""
        return [{"path": d.written, "used_by": d.used_by, "blend": _rel_or_abs(d.blend, self.root)}
                for d in self.missing]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _rel_or_abs(path: Path, root: Path) -> str:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _block_label(name: bytes, block=None) -> str:
    """The data-block that reads a path, for the creator: "image 'a.png'"; a sequencer strip's data has no
    ID name (BAT reports the strip's StripData block, named "-unnamed-")."""
    text = name.decode("utf-8", "replace")
    if text[:2] not in ID_NAMES and block is not None and getattr(block, "dna_type_name", "") in (
            "Strip", "Sequence", "StripData"):
        return "sequencer strip"
    return f"{ID_NAMES.get(text[:2], text[:2].lower())} {text[2:]!r}"


# ------------------------------------------------------------------ tracing
def trace_bat(scene: Path) -> list[Dependency]:
    """Every path the scene and (recursively, each traced whole) its libraries read, by BAT."""
    import logging

    from blender_asset_tracer import blendfile, trace

    logging.getLogger("blender_asset_tracer").setLevel(logging.ERROR)  # missing files are reported by us
    deps: list[Dependency] = []
    todo, seen = [Path(os.path.abspath(scene))], set()
    try:
        while todo:
            blend = todo.pop()
            if blend in seen:
                continue
            seen.add(blend)
            for usage in trace.deps(blend):
                holder = Path(os.path.abspath(usage.block.bfile.filepath))
                if holder != blend:
                    continue  # reached through a library: that library is traced whole on its own
                written = bytes(usage.asset_path).decode("utf-8", "surrogateescape")
                try:
                    files = [Path(os.path.abspath(p)) for p in usage.files() if Path(p).is_file()]
                except OSError:
                    files = []
                dep = Dependency(blend, written, _block_label(usage.block_name, usage.block), files,
                                 not written.startswith("//") and os.path.isabs(written), usage)
                deps.append(dep)
                if usage.block_name[:2] == b"LI" and files:
                    todo.append(files[0])
    finally:
        blendfile.close_all_cached()
    return deps


_BPY_TRACE = r"""
import json, os, sys
out = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)
import bpy
bpy.context.preferences.filepaths.use_scripts_auto_execute = False
bpy.ops.wm.open_mainfile(filepath=sys.argv[-1], load_ui=False, use_scripts=False)
res = []
def add(kind, idb, path, pattern=False):
    if path and path != "<builtin>" and getattr(idb, "library", None) is None:
        res.append({"kind": kind, "name": idb.name, "path": path, "pattern": pattern})
for im in bpy.data.images:
    if im.source in {"FILE", "TILED", "SEQUENCE", "MOVIE"} and not (im.source in {"FILE", "TILED"} and len(im.packed_files)):
        add("image", im, im.filepath, im.source in {"TILED", "SEQUENCE"})
for coll, kind in ((bpy.data.fonts, "font"), (bpy.data.sounds, "sound"), (bpy.data.volumes, "volume")):
    for idb in coll:
        if idb.packed_file is None:
            add(kind, idb, idb.filepath, kind == "volume" and getattr(idb, "is_sequence", False))
for coll, kind in ((bpy.data.cache_files, "cache file"), (bpy.data.movieclips, "movie clip")):
    for idb in coll:
        add(kind, idb, idb.filepath)
for lib in bpy.data.libraries:
    if lib.parent is None and lib.packed_file is None:
        res.append({"kind": "library", "name": lib.name, "path": lib.filepath, "pattern": False})
for tree in [*bpy.data.node_groups, *(m.node_tree for m in bpy.data.materials if m.node_tree and m.library is None),
             *(lt.node_tree for lt in bpy.data.lights if lt.node_tree and lt.library is None)]:
    for node in tree.nodes:
        if node.bl_idname == "ShaderNodeTexIES" and node.mode == "EXTERNAL" and node.filepath:
            res.append({"kind": "IES file", "name": node.name, "path": node.filepath, "pattern": False})
for sc in bpy.data.scenes:
    ed = sc.sequence_editor if sc.library is None else None
    for st in (getattr(ed, "strips_all", None) or getattr(ed, "sequences_all", None) or []) if ed else []:
        if st.type == "IMAGE" and len(st.elements):   # a folder and its frames' names: one pattern, as BAT
            res.append({"kind": "sequencer strip", "name": st.name, "path": st.directory + st.elements[0].filename,
                        "pattern": len(st.elements) > 1})
        elif st.type == "MOVIE" and st.filepath:
            res.append({"kind": "sequencer strip", "name": st.name, "path": st.filepath, "pattern": False})
out.write(json.dumps(res) + "\n"); out.flush()
"""


def _expand(blend: Path, written: str, pattern: bool) -> list[Path]:
    """Files a path written in ``blend`` names: one, or a sequence's frames / a UDIM set's tiles."""
    base = blend.parent / written[2:] if written.startswith("//") else Path(written)
    base = Path(os.path.abspath(base))
    if not pattern:
        return [base] if base.is_file() else []
    import re
    name = base.name
    if "<UDIM>" in name:
        rx = re.compile(re.escape(name).replace(re.escape("<UDIM>"), r"\d{4}") + "$")
    else:  # a frame number: the last run of digits
        m = list(re.finditer(r"\d+", name))
        if not m:
            return [base] if base.is_file() else []
        d = m[-1]
        rx = re.compile(re.escape(name[:d.start()]) + r"\d+" + re.escape(name[d.end():]) + "$")
    try:
        return sorted(p for p in base.parent.iterdir() if rx.match(p.name) and p.is_file())
    except OSError:
        return []


def _bpy_command(blend: Path, python: str | None, blender: str | None) -> list[str]:
    """How to run the tracing script on ``blend``: a Blender binary (inside Blender, whose Python has no bpy
    module), or a Python with the bpy module (default: this one)."""
    if blender:
        return [blender, "--background", "--factory-startup", "--disable-autoexec", "--python-exit-code", "1",
                "--python-expr", _BPY_TRACE, "--", str(blend)]
    return [python or sys.executable, "-c", _BPY_TRACE, str(blend)]


def trace_bpy(scene: Path, python: str | None = None, blender: str | None = None) -> list[Dependency]:
    """The same, read by Blender itself in a child process (scripts off), for files BAT cannot read."""
    deps: list[Dependency] = []
    todo, seen = [Path(os.path.abspath(scene))], set()
    while todo:
        blend = todo.pop()
        if blend in seen:
            continue
        seen.add(blend)
        with tempfile.TemporaryDirectory(prefix="renderhive-trace-") as home:
            env = {**os.environ, "BLENDER_USER_RESOURCES": home, "XDG_CACHE_HOME": home}
            res = subprocess.run(_bpy_command(blend, python, blender), capture_output=True, text=True, env=env,
                                 timeout=600, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise ProjectError(f"Blender could not read {blend}: {res.stderr.strip()[-500:]}")
        for item in json.loads(res.stdout.strip().splitlines()[-1]):
            files = _expand(blend, item["path"], item["pattern"])
            deps.append(Dependency(blend, item["path"], f"{item['kind']} {item['name']!r}", files,
                                   not item["path"].startswith("//")))
            if item["kind"] == "library" and files:
                todo.append(files[0])
    return deps


def trace(scene: Path, blender: str | None = None) -> tuple[list[Dependency], str, str]:
    """(dependencies, tracer used, why not BAT): BAT, else bpy in a child process when BAT fails on this file
    or is not installed (inside Blender: ``blender`` is its binary). Measured on projects saved by Blender 4.2
    and 5.0 (bench/README.md): BAT reads both and agrees with bpy file for file, in 0.2-0.5 s against 3-11 s."""
    try:
        return trace_bat(scene), "bat", ""
    except Exception as exc:  # BAT raises its own errors on file versions it cannot parse
        why = f"BAT could not read it ({type(exc).__name__}: {str(exc)[:200]}); Blender traced it instead"
        if isinstance(exc, ImportError):
            why = "BAT is not installed here; Blender traced it instead"
        if not blender:
            try:
                import importlib.util
                if importlib.util.find_spec("bpy") is None:
                    raise ProjectError(f"cannot trace {scene} (BAT: {exc}); install bpy to trace it with Blender")
            except ValueError:
                pass
        return trace_bpy(scene, blender=blender), "bpy", why


# ------------------------------------------------------------------ the project
def _sha(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def _inside(path: Path, root: Path) -> str | None:
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return None


def _rewrite(blend: Path, deps: list[Dependency], root: Path, into: Path) -> Path:
    """A copy of ``blend`` whose absolute paths (inside ``root``) are ``//relative`` (BAT writes them)."""
    from blender_asset_tracer import blendfile

    dst = into / f"{len(list(into.iterdir()))}-{blend.name}"
    bf = blendfile.open_cached(blend)
    try:
        bf.copy_and_rebind(dst, mode="rb+")
        for d in deps:
            usage = d.field_rewrite
            target = Path(os.path.abspath(d.written))
            rel = "//" + posixpath.relpath(target.as_posix(), blend.parent.as_posix())
            block = bf.dereference_pointer(usage.block.addr_old)
            fld = usage.path_full_field or usage.path_dir_field
            value = rel if usage.path_full_field else "//" + posixpath.relpath(target.parent.as_posix(),
                                                                             blend.parent.as_posix()) + "/"
            block.set(fld.name.name_only, value.encode())
    finally:
        blendfile.close_all_cached()
    return _deterministic(dst)


def _deterministic(path: Path) -> Path:
    """BAT recompresses a changed file with gzip, whose header holds the time: recompress it without one
    (zstd, as Blender saves), so the same rewrite always hashes the same and a resubmit uploads nothing."""
    import gzip
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return path
    with gzip.open(path, "rb") as f:
        raw = f.read()
    try:
        import zstandard
        data = zstandard.ZstdCompressor(level=3).compress(raw)
    except ImportError:
        data = gzip.compress(raw, mtime=0)
    path.write_bytes(data)
    return path


def build(scene: Path, root: Path | None = None, hash_progress: Callable[[int], None] | None = None,
          blender: str | None = None) -> Project:
    """Trace ``scene``, check its files against the project ``root`` (default: the scene's folder), rewrite
    absolute paths, and hash everything. Raises ProjectError when a path cannot go in a manifest.
    ``blender``: a Blender binary to trace with when BAT cannot (the add-on passes its own)."""
    t0 = time.perf_counter()
    scene = Path(os.path.abspath(scene))
    root = Path(os.path.abspath(root or scene.parent))
    scene_rel = _inside(scene, root)
    if scene_rel is None:
        raise ProjectError(f"the scene {scene} is not inside the project root {root}: pick a --project-root "
                           "that holds it")
    deps, tracer, why = trace(scene, blender)
    files: dict[str, Path] = {scene_rel: scene}
    missing, outside, to_rewrite = [], [], {}
    for d in deps:
        if not d.files:
            missing.append(d)
            continue
        rels = [_inside(f, root) for f in d.files]
        if any(r is None for r in rels):
            outside.append(d)
            continue
        for rel, f in zip(rels, d.files):
            files[rel] = f
        if d.absolute:
            to_rewrite.setdefault(d.blend, []).append(d)
    if outside:
        lines = "\n".join(f"  - {d.describe(root)} (at {d.files[0]})" for d in outside[:50])
        raise ProjectError(f"{len(outside)} file(s) the scene needs lie outside the project root {root}, and "
                           f"nothing outside it is shipped:\n{lines}\nsubmit with --project-root set to a "
                           "folder that holds them all (e.g. your asset library's parent)")
    for rel in files:
        try:
            check_path(rel)
        except ManifestError as exc:
            raise ProjectError(f"{rel!r} cannot be shipped: {exc}") from None
    project = Project(root, scene_rel, files, Manifest(scene_rel, {}), {}, missing, [], tracer=tracer,
                      tracer_note=why)
    if to_rewrite and tracer != "bat":
        raise ProjectError("absolute paths found, which only a BAT-readable file can have rewritten: make them "
                           "relative in Blender (File > External Data > Make Paths Relative) and save")
    if to_rewrite:
        project._tmp = tempfile.TemporaryDirectory(prefix="renderhive-rewrite-")
        for blend, ds in to_rewrite.items():
            rel = _inside(blend, root)
            files[rel] = _rewrite(blend, ds, root, Path(project._tmp.name))
            project.rewritten.append(rel)
    manifest = {}
    for rel, path in files.items():
        manifest[rel] = _sha(path, hash_progress)
        project.sizes[rel] = path.stat().st_size
    try:   # the manifest's own bounds (file count, total size): a refusal that says what to do, not a traceback
        project.manifest = parse({"scene": scene_rel, "files": [{"path": p, "sha256": h} for p, h in manifest.items()]})
    except ManifestError as exc:
        project.close()
        raise ProjectError(str(exc)) from None
    project.seconds = time.perf_counter() - t0
    return project


MISSING_ADVICE = "or submit with --allow-missing to render without them"


def missing_error(project: Project, advice: str = MISSING_ADVICE) -> ProjectError:
    """The refusal of a project with missing files; ``advice``: how to render without them anyway."""
    lines = "\n".join(f"  - {d.describe(project.root)}" for d in project.missing[:100])
    return ProjectError(f"{len(project.missing)} file(s) the scene reads do not exist on this machine:\n{lines}\n"
                        "put them back (or fix the paths in Blender: File > External Data > Find Missing Files) "
                        f"and submit again, {advice} (Blender renders missing textures pink)")


# ------------------------------------------------------------------ upload
def lacking(client, project: Project) -> dict[str, Path]:
    """The project's blobs the farm lacks: sha256 → the local file to send."""
    by_sha: dict[str, Path] = {}
    for rel, sha in project.manifest.files.items():
        by_sha.setdefault(sha, project.files[rel])
    hashes = list(by_sha)
    missing: list[str] = []
    for i in range(0, len(hashes), 10000):  # the API's bound on one question
        missing += client.missing(hashes[i:i + 10000])
    return {sha: by_sha[sha] for sha in missing}


def batches(todo: dict[str, Path], below: int, max_bytes: int, max_files: int) -> tuple[list, dict[str, Path]]:
    """Split blobs to send into batches of small files (each at most ``max_files`` files, ``max_bytes``
    bytes) and the rest (files of ``below`` bytes or more), one request each."""
    groups: list[list[tuple[str, Path]]] = []
    rest: dict[str, Path] = {}
    size = 0
    for sha, path in todo.items():
        n = path.stat().st_size
        if n >= below:
            rest[sha] = path
            continue
        if not groups or len(groups[-1]) >= max_files or size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((sha, path))
        size += n
    return groups, rest


def upload(client, project: Project, progress: Callable[[str, int], None] | None = None,
           resumable_above: int | None = None, todo: dict[str, Path] | None = None,
           batch_below: int | None = None) -> dict[str, int]:
    """Upload the project's blobs the farm lacks (``todo``: from :func:`lacking`, asked here by default):
    files under ``batch_below`` bytes (default the client's BATCH_BELOW; 0: none) in batches, those of
    ``resumable_above`` bytes or more resumably (default: the client's RESUMABLE_ABOVE), the rest one PUT each.
    The client waits out the farm's upload rate (429 with Retry-After) as it goes. Returns {"files",
    "blobs_sent", "bytes_sent", "requests" (uploads sent, not counting waits), "waited_s" (seconds waited
    for the farm's limits)}."""
    missing = lacking(client, project) if todo is None else todo
    sent, requests, waited = 0, 0, getattr(client, "waited", 0.0)
    below = getattr(client, "batch_below", 0) if batch_below is None else batch_below
    groups, rest = batches(missing, below, getattr(client, "batch_bytes", 0), getattr(client, "batch_files", 1))
    for i, group in enumerate(groups):
        try:
            client.upload_batch(group, (lambda p, n: progress(p.name, n)) if progress else None)
        except Exception as exc:
            if getattr(exc, "status", None) not in (404, 405):
                raise
            for g in groups[i:]:   # a farm without batch uploads: one PUT each
                rest.update(g)
            break
        sent += sum(p.stat().st_size for _, p in group)
        requests += 1
    for sha, path in rest.items():
        sent += client.upload_any(path, sha, (lambda n, _p=path: progress(_p.name, n)) if progress else None,
                                  resumable_above)
        requests += 1
    return {"files": len(project.manifest.files), "blobs_sent": len(missing), "bytes_sent": sent,
            "requests": requests, "waited_s": getattr(client, "waited", 0.0) - waited}
