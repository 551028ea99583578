"""Build the sample scenes used by the worker benchmark and the tests.

Run with the project's Python (bpy is a module there, no Blender UI):

    python sample_scenes/build_samples.py [--out DIR]
        writes DIR/turntable.blend (default DIR: this folder)
    python sample_scenes/build_samples.py --malicious MARKER --out-file PATH
        writes PATH: the turntable plus three attacks, each of which would
        create MARKER (or files under MARKER + "_fileoutput/") if the file
        were opened and rendered without the worker's safeguards.

Every scene is built from factory settings, so the output does not depend
on the user's preferences or startup file. The builder functions
(`build_turntable`, `build_malicious`, `build_external_texture`,
`build_linked`) are importable; each call resets bpy's data first.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import bpy
import numpy as np
from mathutils import Vector

HERE = Path(__file__).resolve().parent
FRAMES = (1, 24)
CHECKER_NAME = "checker"


def _reset() -> None:
    # use_empty: no default cube/camera/light; we create everything ourselves.
    bpy.ops.wm.read_factory_settings(use_empty=True)
    # Drivers and text blocks built below must never run in the builder.
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False


def _material(name: str, color, metallic=0.0, roughness=0.5, image=None):
    mat = bpy.data.materials.new(name)
    # 5.0: new materials always have a node tree (use_nodes is deprecated).
    nt = mat.node_tree
    bsdf = next(n for n in nt.nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Base Color"].default_value = (*color, 1.0)
    bsdf.inputs["Metallic"].default_value = metallic
    bsdf.inputs["Roughness"].default_value = roughness
    if image is not None:
        tex = nt.nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.interpolation = "Closest"  # crisp checker edges
        nt.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def _checker_image() -> bpy.types.Image:
    """64x64 checker with a diagonal colour gradient, packed into the file."""
    n, cell = 64, 8
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    check = (((np.arange(n)[:, None] // cell) + (np.arange(n)[None, :] // cell)) % 2).astype(np.float32)
    rgba = np.empty((n, n, 4), dtype=np.float32)
    rgba[..., 0] = 0.15 + 0.75 * check * x
    rgba[..., 1] = 0.15 + 0.60 * check * y
    rgba[..., 2] = 0.25 + 0.50 * (1.0 - check)
    rgba[..., 3] = 1.0
    img = bpy.data.images.new(CHECKER_NAME, n, n, alpha=False)
    img.pixels.foreach_set(rgba.ravel())
    img.pack()  # stored as PNG inside the .blend: the file stays self-contained
    return img


def _add(obj_data_op, name: str, mat, parent=None, **kw):
    obj_data_op(**kw)
    obj = bpy.context.active_object
    obj.name = name
    obj.data.materials.append(mat)
    if parent is not None:
        obj.parent = parent
    return obj


def _look_at(obj, target=(0.0, 0.0, 0.0)) -> None:
    direction = Vector(target) - obj.location
    obj.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()


def _build_turntable_content() -> bpy.types.Scene:
    sc = bpy.context.scene
    sc.name = "Turntable"
    sc.frame_start, sc.frame_end = FRAMES
    sc.render.fps, sc.render.fps_base = 24, 1.0

    img = _checker_image()
    m_ground = _material("Ground", (1, 1, 1), roughness=0.8, image=img)
    m_red = _material("RedPlastic", (0.8, 0.08, 0.05), roughness=0.35)
    m_blue = _material("BlueMetal", (0.1, 0.25, 0.9), metallic=1.0, roughness=0.25)
    m_green = _material("GreenMatte", (0.1, 0.7, 0.15), roughness=0.9)
    m_gold = _material("Gold", (1.0, 0.7, 0.2), metallic=1.0, roughness=0.15)

    mesh = bpy.ops.mesh
    _add(mesh.primitive_plane_add, "Ground", m_ground, size=8.0, location=(0, 0, 0))

    # An empty carries the rotation; the primitives are its children.
    table = bpy.data.objects.new("Turntable", None)
    sc.collection.objects.link(table)
    _add(mesh.primitive_cube_add, "Cube", m_red, table, size=1.0, location=(1.5, 0, 0.5))
    _add(mesh.primitive_uv_sphere_add, "Sphere", m_blue, table, radius=0.6, location=(-1.5, 0, 0.6),
         segments=24, ring_count=12)
    _add(mesh.primitive_cone_add, "Cone", m_green, table, radius1=0.6, depth=1.4, location=(0, 1.5, 0.7),
         vertices=24)
    _add(mesh.primitive_torus_add, "Torus", m_gold, table, major_radius=0.55, minor_radius=0.18,
         location=(0, -1.5, 0.5), rotation=(math.radians(70), 0, 0), major_segments=32, minor_segments=12)

    # One full turn over 24 frames: keys at 1 (0) and 25 (2*pi), linear, so
    # frame 24 is 345 degrees and the loop is seamless. 15 degrees per frame
    # makes consecutive frames clearly different.
    table.rotation_euler = (0, 0, 0)
    table.keyframe_insert("rotation_euler", index=2, frame=1)
    table.rotation_euler = (0, 0, 2 * math.pi)
    table.keyframe_insert("rotation_euler", index=2, frame=FRAMES[1] + 1)
    from bpy_extras import anim_utils  # 5.0: actions are layered, no Action.fcurves
    ad = table.animation_data
    for fc in anim_utils.action_get_channelbag_for_slot(ad.action, ad.action_slot).fcurves:
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"

    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 35
    cam = bpy.data.objects.new("Camera", cam_data)
    sc.collection.objects.link(cam)
    cam.location = (0.0, -7.5, 4.5)
    _look_at(cam, (0, 0, 0.4))
    sc.camera = cam

    sun_data = bpy.data.lights.new("Sun", "SUN")
    sun_data.energy = 3.0
    sun_data.angle = math.radians(5)
    sun = bpy.data.objects.new("Sun", sun_data)
    sc.collection.objects.link(sun)
    sun.rotation_euler = (math.radians(40), math.radians(15), math.radians(30))
    fill_data = bpy.data.lights.new("Fill", "POINT")
    fill_data.energy = 300.0
    fill_data.color = (0.7, 0.8, 1.0)
    fill = bpy.data.objects.new("Fill", fill_data)
    sc.collection.objects.link(fill)
    fill.location = (-4.0, -3.0, 3.0)

    world = bpy.data.worlds.new("World")
    world.color = (0.05, 0.05, 0.08)
    sc.world = world
    if world.node_tree is not None:  # 5.0 creates the background node tree
        bg = next((n for n in world.node_tree.nodes if n.type == "BACKGROUND"), None)
        if bg is not None:
            bg.inputs["Color"].default_value = (0.05, 0.05, 0.08, 1.0)

    r = sc.render
    r.engine = "CYCLES"
    sc.cycles.device = "CPU"
    sc.cycles.samples = 16
    sc.cycles.use_denoising = False
    r.resolution_x, r.resolution_y, r.resolution_percentage = 320, 240, 100
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    r.image_settings.color_depth = "8"
    r.filepath = "//render/frame_####"
    sc.frame_set(FRAMES[0])
    return sc


def _save(path: Path) -> Path:
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=True)
    return path


def build_turntable(path) -> Path:
    """The benchmark/test scene: 24 frames, 5 materials, a packed texture."""
    _reset()
    _build_turntable_content()
    return _save(path)


def _file_output_node(tree, directory: str, source_socket):
    node = tree.nodes.new("CompositorNodeOutputFile")
    node.directory = directory  # 5.0 splits the old base_path into directory + file_name
    node.file_name = "stolen_"
    node.format.media_type = "IMAGE"
    node.format.file_format = "PNG"
    node.file_output_items.new("RGBA", "Image")
    tree.links.new(source_socket, node.inputs["Image"])
    return node


def build_malicious(path, marker_path) -> Path:
    """The turntable plus three ways to write files at render time.

    (a) text block `evil.py` registered as a module (runs on load with
        auto-run scripts), (b) a scripted driver whose expression writes the
        marker, (c) compositor File Output nodes, one at the top level of the
        scene's compositor and one inside a nested node group, writing under
        `marker_path + "_fileoutput/"`. All three write nothing in the worker.
    """
    _reset()
    sc = _build_turntable_content()
    marker = str(Path(marker_path).resolve())
    payload = f"__import__('builtins').open(r'{marker}', 'w').write('x')"

    text = bpy.data.texts.new("evil.py")
    text.write(f"# runs on file load when scripts are trusted\n{payload}\n")
    text.use_module = True

    # The expression evaluates to 0 when it runs, so it does not move the object.
    fc = bpy.data.objects["Turntable"].driver_add("location", 2)
    fc.driver.type = "SCRIPTED"
    fc.driver.expression = f"{payload} * 0"

    # 5.0: the compositor is a node-group data-block assigned to the scene;
    # the composite result is its Group Output (there is no Composite node).
    outdir = marker + "_fileoutput/"
    comp = bpy.data.node_groups.new("Compositing", "CompositorNodeTree")
    comp.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    sc.compositing_node_group = comp
    rl = comp.nodes.new("CompositorNodeRLayers")
    out = comp.nodes.new("NodeGroupOutput")
    comp.links.new(rl.outputs["Image"], out.inputs["Image"])
    _file_output_node(comp, outdir, rl.outputs["Image"])

    inner = bpy.data.node_groups.new("Innocent Group", "CompositorNodeTree")
    inner.interface.new_socket("Image", in_out="INPUT", socket_type="NodeSocketColor")
    gin = inner.nodes.new("NodeGroupInput")
    _file_output_node(inner, outdir + "nested/", gin.outputs["Image"])
    grp = comp.nodes.new("CompositorNodeGroup")
    grp.node_tree = inner
    comp.links.new(rl.outputs["Image"], grp.inputs["Image"])
    return _save(path)


def build_external_texture(path, image_path) -> Path:
    """The turntable with its texture as an external, unpacked file.

    `image_path` need not exist: a missing one is what the worker must refuse.
    """
    _reset()
    _build_turntable_content()
    img = bpy.data.images[CHECKER_NAME]
    img.unpack(method="REMOVE")  # drop the packed copy, keep the datablock
    img.source = "FILE"
    img.filepath = str(image_path)
    return _save(path)


def build_linked(path, library_blend) -> Path:
    """A scene that links (does not append) an object from another .blend."""
    _reset()
    _build_turntable_content()
    with bpy.data.libraries.load(str(library_blend), link=True) as (src, dst):
        dst.objects = ["Cube"]
    for obj in dst.objects:
        bpy.context.scene.collection.objects.link(obj)
    return _save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="directory for turntable.blend")
    ap.add_argument("--malicious", metavar="MARKER", help="build the malicious scene for this marker path")
    ap.add_argument("--out-file", type=Path, help="output path for --malicious")
    args = ap.parse_args(argv)
    if args.malicious:
        if not args.out_file:
            ap.error("--malicious needs --out-file")
        print(build_malicious(args.out_file, args.malicious))
    else:
        print(build_turntable(args.out / "turntable.blend"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
