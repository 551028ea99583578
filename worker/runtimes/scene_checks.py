"""Checks of an untrusted .blend, run in the Blender child: they turn what the sandbox would deny silently
(or what would render wrong) into a refusal the creator can act on.

They are not the defence: the OS sandbox (:mod:`worker.sandbox`) is. A feature this list misses can still
touch nothing outside the child's folder, reach no network and use no more memory than the child may.
What is checked, and when:

* before opening (:func:`check_file`): the file's decompressed size (gzip and zstd .blend files), so a
  small file cannot expand past the child's memory while Blender reads it;
* after opening (:func:`check_loaded`): an active camera, linked libraries, fluid domains (their cache is
  read and written by path), geometry-node importers, Freestyle in Python scripting mode;
* before every frame, after ``frame_set`` (:func:`check_frame`): everything a keyframe or driver can
  switch on after load, as the frame will render it — Open Shading Language, every image of any source
  (single, sequence, UDIM, movie) whose pixels come from a path, IES textures with an external file, fonts,
  volumes, sounds, Alembic/USD caches, movie clips, sequencer image and movie strips (each allowed only
  when its file lies inside the project tree, as every path above);
* :func:`mute_file_outputs`: compositor File Output nodes write wherever the scene says, scripts or not.

This module imports no bpy itself: the child passes its ``bpy`` in (it stays the only importer).
"""
from __future__ import annotations

import gzip
import os

PACK_HINT = "pack it into the .blend (File > External Data > Pack Resources) and submit again"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


class SceneError(Exception):
    """The scene or the request is at fault: another worker would fail too."""


# ---------------------------------------------------------------------------- before opening
def decompressed_size(path: str, cap: int) -> int:
    """The size ``path`` has once decompressed (its own size when it is not compressed), counted by
    streaming; stops counting past ``cap`` (and returns a number above it)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        stream = gzip.open(path, "rb")
    elif head == ZSTD_MAGIC:
        import zstandard
        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    else:
        return os.path.getsize(path)
    total = 0
    with stream:
        while total <= cap:
            block = stream.read(1 << 22)
            if not block:
                break
            total += len(block)
    return total


def check_file(path: str, cap: int) -> None:
    """Refuse a .blend that expands to more than ``cap`` bytes (a decompression bomb)."""
    size = decompressed_size(path, cap)
    if size > cap:
        raise SceneError(f"the .blend file decompresses to more than {cap / 1024**3:.1f} GiB, more than this "
                         "worker can load: remove unused data (File > Clean Up > Purge Unused Data) or split "
                         "the scene, and submit again")


# ---------------------------------------------------------------------------- after opening
def check_project_files(root: str, cap: int) -> None:
    """Before opening a project's scene: its .blend files (any file with a Blender, zstd or gzip header,
    whatever its name: a library may be linked under any name) together decompress to at most ``cap``."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                head = f.read(7)
            if head.startswith((GZIP_MAGIC, ZSTD_MAGIC, b"BLENDER")):
                total += decompressed_size(path, cap - total)
                if total > cap:
                    raise SceneError(f"the project's .blend files decompress to more than {cap / 1024**3:.1f} "
                                     "GiB, more than this worker can load: purge unused data or split the project")


def inside_project(bpy, filepath: str, library, root: str | None) -> str | None:
    """The worker path ``filepath`` (as written in the scene or in ``library``) resolves to, when it lies
    inside the laid-out project ``root``: ``//`` paths only (resolved against the folder of the .blend that
    holds them), no ``..`` out of the tree, no symlink on the way. None otherwise."""
    if not root or not filepath.startswith("//"):
        return None
    norm = os.path.normpath(bpy.path.abspath(filepath, library=library))
    if not norm.startswith(root + os.sep) or os.path.realpath(norm) != norm:
        return None
    return norm


def _written(filepath: str, library) -> str:
    """A path as the creator wrote it (never the worker's resolution of it)."""
    return repr(filepath) + (f" (in library {library.filepath!r})" if library is not None else "")


def check_loaded(bpy, sc, root: str | None = None) -> None:
    """Refuse what must not be loaded at all (see the module docstring). ``root``: the laid-out project
    tree the scene was opened from, whose files may be read (None: a single .blend)."""
    if sc.camera is None:
        raise SceneError(f"scene {sc.name!r} has no active camera; set one in "
                         "Scene Properties > Camera and resubmit")
    # Packed libraries and 5.0 "archive" libraries (packed linked data) are self-contained; anything else
    # reads another .blend from disk.
    linked = [lib.filepath for lib in bpy.data.libraries if lib.packed_file is None and not lib.is_archive
              and not _exists_inside(bpy, lib.filepath, None, root)]
    if linked:
        raise SceneError("the scene links data from other .blend files that are not in its project ("
                         + ", ".join(map(repr, linked)) + "); submit with `farm submit` (which ships the "
                         "libraries the scene links), make it local (Object > Relations > Make Local) or pack "
                         "the libraries (File > External Data > Pack Resources) and resubmit")
    for tree in bpy.data.node_groups:
        for node in tree.nodes:
            if node.bl_idname.startswith("GeometryNodeImport"):
                raise SceneError(f"node {node.name!r} in {tree.name!r} imports a file by path at render "
                                 "time; apply or realize its result (e.g. apply the modifier) and resubmit")
    # Refusing a fluid domain stops it from rendering, but Blender has already simulated it once while
    # loading and written cache files to the domain's cache_directory, a path the scene chooses: the
    # sandbox keeps those writes inside the child's own folder. A baked cache shipped in the project is
    # refused too: measured (issue 19), the bpy module this runtime is (4.2 and 5.0 alike) aborts the
    # whole process in mantaflow ("can't clean grid cache") as soon as a domain with a flow is evaluated,
    # so a domain cannot even replay its cache here. Its baked result as a volume or a mesh cache can.
    for obj in bpy.data.objects:
        for mod in obj.modifiers:
            if mod.type == "FLUID" and mod.fluid_type == "DOMAIN":
                raise SceneError(f"fluid domain {obj.name!r}: fluid simulations are not supported on "
                                 "the farm (their cache is read and written in a folder on disk, and the "
                                 "farm's Blender cannot replay one); render the baked result instead: a gas "
                                 "as a Volume object reading the cache's .vdb files, a liquid exported to "
                                 "Alembic (File > Export), both shipped by `farm submit` with the project")
    for scene in bpy.data.scenes:
        for vl in scene.view_layers:
            if scene.render.use_freestyle and vl.use_freestyle and vl.freestyle_settings.mode == "SCRIPT":
                raise SceneError(f"Freestyle in view layer {vl.name!r} uses Python style modules, which are "
                                 "scripts: switch Freestyle to Parameter Editor mode (View Layer Properties > "
                                 "Freestyle) and resubmit")


def mute_file_outputs(bpy) -> int:
    """Mute every compositor File Output node. In 5.0 every compositor tree (the scene's
    compositing_node_group, nested groups, VSE compositor modifiers) is in bpy.data.node_groups, and
    ``mute`` is not animatable, so no driver or keyframe can undo this."""
    muted = 0
    for tree in bpy.data.node_groups:
        for node in tree.nodes:
            if node.bl_idname == "CompositorNodeOutputFile":
                node.mute = True
                muted += 1
    return muted


# ---------------------------------------------------------------------------- every frame
def _exists_inside(bpy, filepath: str, library, root: str | None) -> bool:
    path = inside_project(bpy, filepath, library, root)
    return path is not None and os.path.isfile(path)


def check_frame(bpy, sc, frame: int, root: str | None = None, allow_missing: bool = False) -> None:
    """Refuse what frame ``frame`` would read from a path, as it will render (after ``frame_set``); with a
    project ``root``, a path inside the tree is allowed (missing there too only with ``allow_missing``)."""
    at = f" at frame {frame}"

    def _external(what, filepath, library, movie=False, pattern=False):
        path = inside_project(bpy, filepath, library, root)
        if path is not None:
            there = os.path.isdir(os.path.dirname(path)) if pattern else os.path.isfile(path)
            if there or allow_missing:
                return
            raise SceneError(f"{what} uses the file {_written(filepath, library)}, which is not in the "
                             "project: submit with `farm submit` from the scene's folder, or --allow-missing")
        _refuse_external(bpy, what, filepath, library, movie, root)
    if sc.render.engine == "CYCLES" and sc.cycles.shading_system:
        raise SceneError("Open Shading Language is not allowed on the farm (OSL shaders can read files by "
                         f"path), and it is on{at}: turn off Render Properties > Open Shading Language, and "
                         "any keyframe or driver that turns it on, and resubmit")
    for img in bpy.data.images:
        if img.users <= int(img.use_fake_user):   # kept but used nowhere: harmless
            continue
        if img.source in {"SEQUENCE", "MOVIE"}:   # read frame by frame from the path: never packed
            _external(f"image {img.name!r} ({img.source.lower()}{at})", img.filepath, img.library, movie=True,
                      pattern=img.source == "SEQUENCE")
        elif img.source in {"FILE", "TILED"} and not len(img.packed_files):
            _external(f"image {img.name!r}", img.filepath, img.library, pattern=img.source == "TILED")
    for coll, label in ((bpy.data.fonts, "font"), (bpy.data.volumes, "volume"), (bpy.data.sounds, "sound")):
        for idb in coll:
            if idb.packed_file is None and idb.filepath and idb.filepath != "<builtin>":
                _external(f"{label} {idb.name!r}", idb.filepath, idb.library)
    # Alembic/USD caches and movie clips cannot be packed at all.
    for coll, label in ((bpy.data.cache_files, "cache file"), (bpy.data.movieclips, "movie clip")):
        for idb in coll:
            if idb.users > int(idb.use_fake_user):
                _external(f"{label} {idb.name!r}", idb.filepath, idb.library, movie=True)
    for tree in [*bpy.data.node_groups, *(m.node_tree for m in bpy.data.materials if m.node_tree),
                 *(w.node_tree for w in bpy.data.worlds if w.node_tree),
                 *(lt.node_tree for lt in bpy.data.lights if lt.node_tree)]:
        for node in tree.nodes:
            if node.bl_idname == "ShaderNodeTexIES" and node.mode == "EXTERNAL" and node.filepath:
                if _exists_inside(bpy, node.filepath, tree.library, root):
                    continue
                raise SceneError(f"IES texture {node.name!r} in {tree.name!r} reads the external file "
                                 f"{node.filepath!r}{at}: switch it to Internal and paste the profile into a "
                                 "text block, and resubmit")
            if node.bl_idname == "ShaderNodeScript" and node.mode == "EXTERNAL":
                raise SceneError(f"OSL script node {node.name!r} reads an external file: OSL is not allowed")
    if sc.sequence_editor is not None and sc.render.use_sequencer:
        # Image and movie strips read their media by path, like images: allowed when every file lies inside
        # the project tree (which `farm submit` traces: BAT and the bpy tracer both list strips). A sound
        # strip reads its sound data-block, checked above with the other sounds.
        for st in sc.sequence_editor.strips_all:
            if st.type == "IMAGE":
                for el in st.elements:
                    _external(f"sequencer strip {st.name!r}", st.directory + el.filename, sc.library, movie=True)
            elif st.type == "MOVIE":
                _external(f"sequencer strip {st.name!r}", st.filepath, sc.library, movie=True)


def _refuse_external(bpy, what: str, filepath: str, library, movie: bool, root: str | None) -> None:
    """Refuse an unpacked external file outside any project tree, missing or not.

    A missing one renders silently wrong (images come out pink); an existing one is a file of *this*
    host, which a scene must not be able to read into its output. So both are refused. The message names
    the path as the creator wrote it, never the worker's resolution of it.
    """
    if root and filepath.startswith("//"):
        state = "resolves outside the project (a '..' too many, or a link)"
    elif root:
        state = "is an absolute path, which the farm never reads"
    else:
        state = "is missing" if not os.path.exists(bpy.path.abspath(filepath, library=library)) else "is not packed"
    fix = ("this kind of file cannot be packed: ship it in the project (`farm submit` traces it) or convert it"
           if movie else "ship it in the project (`farm submit` from the scene's folder makes paths relative), or "
           + PACK_HINT)
    raise SceneError(f"{what} uses the external file {_written(filepath, library)}, which {state}; {fix}")
