import os
import sys

ROOT, OUT, SECRET, CANARY = sys.argv[1:5]
sys.path.insert(0, os.path.join(ROOT, "sample_scenes"))
import bpy
import build_samples as b

base = os.path.join(OUT, "turntable.blend")
b.build_turntable(base)
b.build_malicious(os.path.join(OUT, "scripts_and_file_outputs.blend"), os.path.join(CANARY, "marker"))
b.build_linked(os.path.join(OUT, "linked_library.blend"), base)
def variant(name, change):
    bpy.ops.wm.open_mainfile(filepath=base, load_ui=False, use_scripts=False)
    change(bpy.context.scene)
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(OUT, name + ".blend"), compress=True)
def freestyle(sc):
    sc.render.use_freestyle = True
    vl = sc.view_layers[0]
    vl.use_freestyle = True
    vl.freestyle_settings.mode = "SCRIPT"
    t = bpy.data.texts.new("style.py")
    t.write(f"import socket, shutil\nopen({os.path.join(CANARY, 'freestyle')!r}, 'w').write(open({SECRET!r}).read())\n"
            f"socket.create_connection(('127.0.0.1', int(open({os.path.join(CANARY, 'port')!r}).read())))\n")
    vl.freestyle_settings.modules.new().script = t
def osl_keyframe(sc):
    sc.cycles.shading_system = False
    sc.cycles.keyframe_insert("shading_system", frame=1)
    sc.cycles.shading_system = True
    sc.cycles.keyframe_insert("shading_system", frame=2)
    sc.cycles.shading_system = False
def osl_driver(sc):
    fc = sc.cycles.driver_add("shading_system")
    fc.driver.type = "SCRIPTED"
    fc.driver.expression = "frame >= 2"
def packed_sequence(sc):
    img = bpy.data.images["Checker"] if "Checker" in bpy.data.images else next(i for i in bpy.data.images if i.users)
    img.source = "SEQUENCE"
    img.filepath = os.path.join(os.path.dirname(SECRET), "secret_0001.png")
def ies(sc):
    light = next(o for o in bpy.data.objects if o.type == "LIGHT").data
    light.use_nodes = True
    n = light.node_tree.nodes.new("ShaderNodeTexIES")
    n.mode = "EXTERNAL"
    n.filepath = SECRET
    light.node_tree.links.new(n.outputs[0], light.node_tree.nodes["Emission"].inputs["Strength"])
def image_key(sc):
    img = next(i for i in bpy.data.images if i.users)
    img.unpack(method="REMOVE")
    img.source = "FILE"
    img.filepath = SECRET
def udim(sc):
    img = next(i for i in bpy.data.images if i.users)
    img.unpack(method="REMOVE")
    img.source = "TILED"
    img.filepath = os.path.join(os.path.dirname(SECRET), "tex.<UDIM>.png")
def volume(sc):
    v = bpy.data.volumes.new("Smoke")
    v.filepath = SECRET
    bpy.context.scene.collection.objects.link(bpy.data.objects.new("Smoke", v))
def sound(sc):
    s = bpy.data.sounds.load(SECRET, check_existing=False)
    sc.sequence_editor_create()
    s.use_fake_user = False
    sp = bpy.data.speakers.new("Speaker")
    sp.sound = s
    sc.collection.objects.link(bpy.data.objects.new("Speaker", sp))
def font(sc):
    cu = bpy.data.curves.new("Title", "FONT")
    f = bpy.data.fonts.load("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf") if os.path.exists("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf") else None
    if f is None:
        f = cu.font
        f.filepath = SECRET
    cu.font = f
    sc.collection.objects.link(bpy.data.objects.new("Title", cu))
def vse(sc):
    sc.sequence_editor_create().strips.new_image("plate", SECRET, 1, 1)
    sc.render.use_sequencer = True
def gn_import(sc):
    tree = bpy.data.node_groups.new("Importer", "GeometryNodeTree")
    tree.nodes.new("GeometryNodeImportOBJ")
    bpy.data.objects["Cube"].modifiers.new("GN", "NODES").node_group = tree
def memory(sc):
    m = bpy.data.objects["Cube"].modifiers.new("Sub", "SUBSURF")
    m.levels, m.render_levels = 1, 11
def slow(sc):
    sc.cycles.use_adaptive_sampling = False
    sc.cycles.samples = 65536
def fluid(sc):
    mod = bpy.data.objects["Cube"].modifiers.new("Fluid", "FLUID")
    mod.fluid_type = "DOMAIN"
    mod.domain_settings.cache_directory = os.path.join(CANARY, "fluid_cache")
for name, fn in [("freestyle_script", freestyle), ("osl_keyframe", osl_keyframe), ("osl_driver", osl_driver),
                 ("packed_image_as_sequence", packed_sequence), ("ies_external", ies), ("image_reads_key", image_key),
                 ("udim_external", udim), ("volume_external", volume), ("sound_external", sound), ("font_external", font),
                 ("sequencer_strip", vse), ("geometry_nodes_import", gn_import), ("memory_hog", memory),
                 ("time_bomb", slow), ("fluid_cache_outside", fluid)]:
    try:
        variant(name, fn)
        print("built", name)
    except Exception as e:
        print("FAILED", name, repr(e))
os._exit(0)
