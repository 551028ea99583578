"""Build a Blender *project* for tests, with bpy: a scene whose files sit beside it, as artists work.

    python tests/helpers/make_project.py ROOT [--missing]

Writes under ROOT (all tiny, for 32x32 renders):

* ``scene.blend``: the shot; planes with emission materials reading
  ``//wood.png`` (next to it), ``//tex/a.png`` (a subfolder), a UDIM set ``//tex/udim/col.<UDIM>.png``
  (tiles 1001 and 1002), an image sequence ``//seq/f_0001.png`` … ``f_0003.png``, ``ROOT/abs/abs.png``
  by its **absolute** path, a text object with the font ``//fonts/dejavu.ttf``, and a collection linked
  from ``//lib/lib.blend``;
* ``lib/lib.blend``: a plane reading ``//tex/libtex.png`` (relative to the library), and a collection
  linked from ``//sub/deep.blend``;
* ``lib/sub/deep.blend``: a plane reading ``//deep.png``.

With ``--missing`` the scene also reads ``//tex/gone.png``, which is not there. With ``--many N`` it is
instead a scene of N small textures, ``//many/t_0000.png`` …, each its own image node of one material and
each a distinct file (a project of many small files, for the upload rate). With ``--strips`` it is a
sequencer edit: an image-sequence strip reading ``//strips/s_0001.png`` … ``s_0003.png`` (frames 1-3) over
a single-image strip ``//strips/still.png`` (frames 1-5), 32x32, rendered through the sequencer (a scene
with no camera object: the strips are the picture). Prints one JSON line:
{"scene": path, "version": bpy version}.
"""
from __future__ import annotations

import json
import os
import shutil
import sys


def main(argv: list[str]) -> int:
    root = os.path.abspath(argv[0])
    missing = "--missing" in argv
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import bpy

    if "--strips" in argv:
        scene = _strips(bpy, root)
        out.write(json.dumps({"scene": scene, "version": bpy.app.version_string}) + "\n")
        out.flush()
        return 0
    if "--many" in argv:
        scene = _many(bpy, root, int(argv[argv.index("--many") + 1]))
        out.write(json.dumps({"scene": scene, "version": bpy.app.version_string}) + "\n")
        out.flush()
        return 0

    def fresh():
        bpy.ops.wm.read_factory_settings(use_empty=True)
        return bpy.context.scene

    def png(path, rgba, w=4, h=4):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        im = bpy.data.images.new("tmp", w, h)
        im.pixels = list(rgba) * (w * h)
        im.filepath_raw = path
        im.file_format = "PNG"
        im.save()
        bpy.data.images.remove(im)

    def material(name, image=None, color=None, sequence=None):
        mat = bpy.data.materials.new(name)
        mat.use_nodes = True
        nt = mat.node_tree
        nt.nodes.clear()
        emit = nt.nodes.new("ShaderNodeEmission")
        outn = nt.nodes.new("ShaderNodeOutputMaterial")
        nt.links.new(emit.outputs[0], outn.inputs[0])
        if image is not None:
            tex = nt.nodes.new("ShaderNodeTexImage")
            tex.interpolation = "Closest"
            tex.image = image
            if sequence:
                tex.image_user.frame_duration = sequence
                tex.image_user.frame_start = 1
                tex.image_user.use_auto_refresh = True
            nt.links.new(tex.outputs[0], emit.inputs[0])
        elif color is not None:
            emit.inputs[0].default_value = color
        return mat

    def plane(sc, name, mat, x, y, size=0.9, uv_u=(0.0, 1.0)):
        u0, u1 = uv_u
        mesh = bpy.data.meshes.new(name)
        s = size / 2
        mesh.from_pydata([(x - s, y - s, 0), (x + s, y - s, 0), (x + s, y + s, 0), (x - s, y + s, 0)], [],
                         [(0, 1, 2, 3)])
        uv = mesh.uv_layers.new()
        for loop, (u, v) in zip(uv.data, [(u0, 0), (u1, 0), (u1, 1), (u0, 1)]):
            loop.uv = (u, v)
        mesh.materials.append(mat)
        ob = bpy.data.objects.new(name, mesh)
        sc.collection.objects.link(ob)
        return ob

    def load(path, rel):
        im = bpy.data.images.load(path)
        im.filepath = rel
        return im

    # ---- the deepest library: a plane with its own texture, next to it
    sub = os.path.join(root, "lib", "sub")
    png(os.path.join(sub, "deep.png"), (1, 1, 0, 1))
    sc = fresh()
    coll = bpy.data.collections.new("DeepColl")
    sc.collection.children.link(coll)
    ob = plane(sc, "deep", material("deep", load(os.path.join(sub, "deep.png"), "//deep.png")), 1, -1, 0.8)
    sc.collection.objects.unlink(ob)
    coll.objects.link(ob)
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(sub, "deep.blend"))

    # ---- the library: its own texture, and a collection linked from the deeper one
    lib = os.path.join(root, "lib")
    png(os.path.join(lib, "tex", "libtex.png"), (0, 1, 1, 1))
    sc = fresh()
    coll = bpy.data.collections.new("LibColl")
    sc.collection.children.link(coll)
    ob = plane(sc, "libplane", material("lib", load(os.path.join(lib, "tex", "libtex.png"), "//tex/libtex.png")),
               -1, -1, 0.8)
    sc.collection.objects.unlink(ob)
    coll.objects.link(ob)
    with bpy.data.libraries.load(os.path.join(sub, "deep.blend"), link=True, relative=True) as (src, dst):
        dst.collections = ["DeepColl"]
    coll.children.link(bpy.data.collections["DeepColl"])
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(lib, "lib.blend"))

    # ---- the scene
    png(os.path.join(root, "wood.png"), (0.8, 0.4, 0.1, 1))
    png(os.path.join(root, "tex", "a.png"), (1, 0, 0, 1))
    png(os.path.join(root, "tex", "udim", "col.1001.png"), (0, 0, 1, 1))
    png(os.path.join(root, "tex", "udim", "col.1002.png"), (1, 0, 1, 1))
    for i, c in enumerate([(0.2, 0.2, 0.2, 1), (0.5, 0.5, 0.5, 1), (0.9, 0.9, 0.9, 1)], 1):
        png(os.path.join(root, "seq", f"f_{i:04d}.png"), c)
    png(os.path.join(root, "abs", "abs.png"), (0, 0.5, 0, 1))
    os.makedirs(os.path.join(root, "fonts"), exist_ok=True)
    shutil.copyfile(_font(), os.path.join(root, "fonts", "dejavu.ttf"))

    sc = fresh()
    sc.render.engine = "CYCLES"
    sc.cycles.device = "CPU"
    sc.cycles.samples = 2
    sc.cycles.use_denoising = False
    sc.render.resolution_x = sc.render.resolution_y = 32
    sc.frame_start, sc.frame_end = 1, 3
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    cam.data.type = "ORTHO"
    cam.data.ortho_scale = 4.2
    cam.location = (0, 0, 5)
    sc.collection.objects.link(cam)
    sc.camera = cam
    world = bpy.data.worlds.new("w")
    sc.world = world
    plane(sc, "wood", material("wood", load(os.path.join(root, "wood.png"), "//wood.png")), -1, 1)
    plane(sc, "a", material("a", load(os.path.join(root, "tex", "a.png"), "//tex/a.png")), 0, 1)
    udim = bpy.data.images.load(os.path.join(root, "tex", "udim", "col.1001.png"))
    udim.source = "TILED"
    udim.filepath = "//tex/udim/col.<UDIM>.png"
    udim.tiles.new(1002)
    udim.reload()
    plane(sc, "udim", material("udim", udim), 1, 1, uv_u=(0.0, 2.0))
    seq = bpy.data.images.load(os.path.join(root, "seq", "f_0001.png"))
    seq.source = "SEQUENCE"
    seq.filepath = "//seq/f_0001.png"
    plane(sc, "seq", material("seq", seq, sequence=3), -1, 0)
    absimg = bpy.data.images.load(os.path.join(root, "abs", "abs.png"))  # stays absolute (see the save)
    plane(sc, "abs", material("abs", absimg), 0, 0)
    if missing:
        png(os.path.join(root, "tex", "gone.png"), (1, 1, 1, 1))
        plane(sc, "gone", material("gone", load(os.path.join(root, "tex", "gone.png"), "//tex/gone.png")), 1, 0)
    font = bpy.data.fonts.load(os.path.join(root, "fonts", "dejavu.ttf"))
    font.filepath = "//fonts/dejavu.ttf"
    txt = bpy.data.curves.new("txt", "FONT")
    txt.body = "Hi"
    txt.font = font
    txt.size = 0.6
    tob = bpy.data.objects.new("txt", txt)
    tob.location = (-1.9, -2.0, 0.1)
    tob.data.materials.append(material("txtmat", color=(1, 1, 1, 1)))
    sc.collection.objects.link(tob)
    with bpy.data.libraries.load(os.path.join(lib, "lib.blend"), link=True, relative=True) as (src, dst):
        dst.collections = ["LibColl"]
    inst = bpy.data.objects.new("LibInst", None)
    inst.instance_type = "COLLECTION"
    inst.instance_collection = bpy.data.collections["LibColl"]
    sc.collection.objects.link(inst)
    scene = os.path.join(root, "scene.blend")
    bpy.ops.wm.save_as_mainfile(filepath=scene, relative_remap=False)
    if missing:
        os.remove(os.path.join(root, "tex", "gone.png"))
    out.write(json.dumps({"scene": scene, "version": bpy.app.version_string}) + "\n")
    out.flush()
    return 0


def _png_bytes(i: int, w: int = 8, h: int = 8) -> bytes:
    """A tiny RGB PNG whose pixels encode ``i`` (so every file is a distinct blob), written without bpy:
    saving thousands of images through Blender is slow."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    px = bytes([i & 255, (i >> 8) & 255, (i * 37) & 255])
    raw = b"".join(b"\0" + px * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _many(bpy, root: str, n: int) -> str:
    """A scene whose one material reads ``n`` textures from ``//many/`` (see the module docstring)."""
    os.makedirs(os.path.join(root, "many"), exist_ok=True)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    sc = bpy.context.scene
    sc.render.resolution_x = sc.render.resolution_y = 16
    mat = bpy.data.materials.new("many")
    mat.use_nodes = True
    for i in range(n):
        path = os.path.join(root, "many", f"t_{i:04d}.png")
        with open(path, "wb") as f:
            f.write(_png_bytes(i))
        im = bpy.data.images.load(path, check_existing=False)
        im.filepath = f"//many/t_{i:04d}.png"
        mat.node_tree.nodes.new("ShaderNodeTexImage").image = im
    mesh = bpy.data.meshes.new("plane")
    mesh.from_pydata([(-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0)], [], [(0, 1, 2, 3)])
    mesh.materials.append(mat)
    sc.collection.objects.link(bpy.data.objects.new("plane", mesh))
    scene = os.path.join(root, "scene.blend")
    bpy.ops.wm.save_as_mainfile(filepath=scene)
    return scene


def _strips(bpy, root: str) -> str:
    """A sequencer edit reading its media from ``//strips/`` (see the module docstring)."""
    folder = os.path.join(root, "strips")
    os.makedirs(folder, exist_ok=True)
    for i in range(1, 4):
        with open(os.path.join(folder, f"s_{i:04d}.png"), "wb") as f:
            f.write(_png_bytes(i * 60, 16, 16))
    with open(os.path.join(folder, "still.png"), "wb") as f:
        f.write(_png_bytes(200, 32, 32))
    bpy.ops.wm.read_factory_settings(use_empty=True)
    sc = bpy.context.scene
    sc.render.resolution_x = sc.render.resolution_y = 32
    sc.render.resolution_percentage = 100
    sc.render.use_sequencer = True
    sc.frame_start, sc.frame_end = 1, 5
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))   # the farm wants one; strips cover it
    sc.collection.objects.link(cam)
    sc.camera = cam
    scene = os.path.join(root, "scene.blend")
    bpy.ops.wm.save_as_mainfile(filepath=scene)   # first, so that the strips' paths can be relative
    ed = sc.sequence_editor_create()
    strips = ed.strips if hasattr(ed, "strips") else ed.sequences
    still = strips.new_image("still", os.path.join(folder, "still.png"), 1, 1)
    still.frame_final_duration = 5
    seq = strips.new_image("seq", os.path.join(folder, "s_0001.png"), 2, 1)
    for i in (2, 3):
        seq.elements.append(f"s_{i:04d}.png")
    seq.transform.scale_x = seq.transform.scale_y = 0.5
    for st in (still, seq):
        st.directory = "//strips/"
    bpy.ops.wm.save_as_mainfile(filepath=scene, relative_remap=False)
    return scene


def _font() -> str:
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
              "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"):
        if os.path.isfile(p):
            return p
    raise SystemExit("no TrueType font found: install fonts-dejavu-core")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
