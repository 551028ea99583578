"""The Blender runtime child (worker/runtimes/blender.py) through its parent
handle (worker/runtimes/process.py): real bpy, real processes, tiny renders (64x48).

One runtime child is shared by the module; tests that kill a child start
their own. Reference images come from tests/helpers/direct_render.py, run in
a separate process.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.runtimes.process import RuntimeCrashed, RuntimeProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DIRECT = ROOT / "tests" / "helpers" / "direct_render.py"
COMMITTED = ROOT / "sample_scenes" / "turntable.blend"
SMALL = {"format": "PNG", "color_depth": "8", "samples": 4, "resolution_percent": 20,
         "resolution": None, "tile": None}


# ---- fixtures ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bpy_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpy_home")
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(d / "user"), XDG_CACHE_HOME=str(d / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_bpy(code: str, env: dict, timeout: float = 60) -> str:
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, bpy_env):
    """All test scenes, built in one bpy process."""
    d = tmp_path_factory.mktemp("scenes")
    s = {name: d / f"{name}.blend" for name in
         ("turntable", "malicious", "armed", "missing_tex", "linked", "no_camera")}
    s["marker"] = d / "marker"                  # must never appear
    s["armed_marker"] = d / "armed_marker"      # positive control: does appear
    s["missing_png"] = d / "textures" / "checker_missing.png"
    run_bpy(f"""
import sys; sys.path.insert(0, {str(ROOT / 'sample_scenes')!r})
import bpy, build_samples as b
b.build_turntable({str(s['turntable'])!r})
b.build_malicious({str(s['malicious'])!r}, {str(s['marker'])!r})
b.build_malicious({str(s['armed'])!r}, {str(s['armed_marker'])!r})
b.build_external_texture({str(s['missing_tex'])!r}, {str(s['missing_png'])!r})
b.build_linked({str(s['linked'])!r}, {str(s['turntable'])!r})
def variant(name, change):
    bpy.ops.wm.open_mainfile(filepath={str(s['turntable'])!r}, load_ui=False, use_scripts=False)
    change(bpy.context.scene)
    bpy.ops.wm.save_as_mainfile(filepath={str(d)!r} + "/" + name + ".blend", compress=True)
def vse(sc):
    sc.sequence_editor_create().strips.new_image("plate", {str(d / 'plate.png')!r}, 1, 1)
    sc.render.use_sequencer = True
def gn_import(sc):
    tree = bpy.data.node_groups.new("Importer", "GeometryNodeTree")
    tree.nodes.new("GeometryNodeImportOBJ")
    bpy.data.objects["Cube"].modifiers.new("GN", "NODES").node_group = tree
def fluid(sc):
    mod = bpy.data.objects["Cube"].modifiers.new("Fluid", "FLUID")
    mod.fluid_type = "DOMAIN"
    mod.domain_settings.cache_directory = {str(d / 'fluid_cache')!r}
variant("no_camera", lambda sc: setattr(sc, "camera", None))
variant("osl", lambda sc: setattr(sc.cycles, "shading_system", True))
variant("vse", vse)
variant("gn_import", gn_import)
variant("fluid", fluid)   # last: mantaflow aborts when its data is freed, so skip teardown
import os; os._exit(0)
""", bpy_env)
    for name in ("osl", "vse", "gn_import", "fluid"):
        s[name] = d / f"{name}.blend"
    data = s["turntable"].read_bytes()
    s["truncated"] = d / "truncated.blend"
    s["truncated"].write_bytes(data[: len(data) * 2 // 3])
    s["random"] = d / "random.blend"
    s["random"].write_bytes(np.random.default_rng(7).bytes(20000))
    return s


@pytest.fixture(scope="module")
def rt(loop, tmp_path_factory):
    proc = RuntimeProcess("worker.runtimes.blender", ["--gpus", "all"], tmp_path_factory.mktemp("rt"))
    loop.run_until_complete(proc.start(timeout=120))
    yield proc
    assert loop.run_until_complete(proc.stop(timeout=20)) == 0


# ---- helpers ----------------------------------------------------------------
def key_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def collect(proc: RuntimeProcess, payload: dict) -> list[dict]:
    return [ev async for ev in proc.request(payload)]


def render(loop, proc, scene: Path, frames, out_dir: Path, key: str | None = None, **settings):
    payload = {"op": "render", "scene": str(scene), "scene_key": key or key_of(scene),
               "frames": list(frames), "out_dir": str(out_dir), "settings": {**SMALL, **settings}}
    return loop.run_until_complete(collect(proc, payload))


def direct(env, scene: Path, frames, out_dir: Path, *extra: str) -> list[dict]:
    res = subprocess.run([sys.executable, str(DIRECT), str(scene), str(out_dir),
                          "--frames", ",".join(map(str, frames)), *extra],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)["outputs"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        return np.asarray(im)


def png_header(path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    data = Path(path).read_bytes()[:33]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">IIBB", data[16:26])


def exr_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:4] == bytes.fromhex("762f3101")
    pos = 8                                   # magic + version; then name\0type\0size data
    while data[pos] != 0:
        name_end = data.index(b"\0", pos)
        type_end = data.index(b"\0", name_end + 1)
        (size,) = struct.unpack("<i", data[type_end + 1:type_end + 5])
        if data[pos:name_end] == b"dataWindow":
            x0, y0, x1, y1 = struct.unpack("<4i", data[type_end + 5:type_end + 21])
            return x1 - x0 + 1, y1 - y0 + 1
        pos = type_end + 5 + size
    raise AssertionError("no dataWindow in EXR header")


def ok(events: list[dict]) -> dict:
    assert events[-1]["event"] == "done", events[-1]
    return events[-1]


def refused(events: list[dict]) -> str:
    assert len(events) == 1 and events[0]["event"] == "error", events
    assert events[0]["retryable"] is False
    return events[0]["message"]


# ---- tests ------------------------------------------------------------------
def test_ready_event(rt):
    ready = rt.ready
    assert ready["event"] == "ready" and ready["pid"] == rt.pid
    assert ready["bpy_version"].startswith("5.0")
    assert "CYCLES" in ready["engines"]
    assert ready["gpu"] == any(d["type"] != "CPU" for d in ready["devices"])
    assert ready["devices"] and all({"type", "name", "id"} <= d.keys() for d in ready["devices"])


def test_ping(loop, rt):
    first = loop.run_until_complete(collect(rt, {"op": "ping"}))
    second = loop.run_until_complete(collect(rt, {"op": "ping"}))
    assert [e["event"] for e in first + second] == ["pong", "pong"]
    assert second[0]["id"] == first[0]["id"] + 1


def test_render_matches_direct_render(loop, rt, scenes, bpy_env, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="worker.runtimes.process")
    events = render(loop, rt, scenes["turntable"], [1, 2], tmp_path / "rt")
    assert [e["event"] for e in events] == ["frame", "frame", "done"]
    assert [o["frame"] for o in events[-1]["outputs"]] == [1, 2]
    ref = direct(bpy_env, scenes["turntable"], [1, 2], tmp_path / "ref",
                 "--samples", "4", "--resolution-percent", "20")
    got = [pixels(o["path"]) for o in events[-1]["outputs"]]
    want = [pixels(o["path"]) for o in ref]
    for g, w in zip(got, want):
        assert g.shape == (48, 64, 4)
        np.testing.assert_array_equal(g, w)      # persistent data changes nothing
    assert np.abs(got[0].astype(int) - got[1].astype(int)).mean() > 1.0   # it turns
    # Blender's own log lines went to stderr, never onto the protocol stream.
    assert not [r for r in caplog.records if "non-JSON" in r.getMessage()]


def test_png16_and_exr(loop, rt, scenes, tmp_path):
    ev16 = ok(render(loop, rt, scenes["turntable"], [3], tmp_path, color_depth="16"))
    assert png_header(ev16["outputs"][0]["path"]) == (64, 48, 16, 6)    # 16-bit RGBA
    for depth in ("16", "32"):
        ev = ok(render(loop, rt, scenes["turntable"], [3], tmp_path / depth, format="EXR", color_depth=depth))
        path = ev["outputs"][0]["path"]
        assert path.endswith("frame_0003.exr") and exr_size(path) == (64, 48)
    assert not ev["reloaded"]


def test_same_scene_is_not_reloaded_and_settings_reset(loop, rt, scenes, bpy_env, tmp_path):
    key = "reuse-" + key_of(scenes["turntable"])      # a fresh key forces one load
    first = ok(render(loop, rt, scenes["turntable"], [5], tmp_path / "a", key=key,
                      resolution=[100, 80], samples=4))
    assert first["reloaded"] is True
    assert Image.open(first["outputs"][0]["path"]).size == (20, 16)
    # No overrides: the file's own 320x240 and 16 samples, at 20 %.
    second = ok(render(loop, rt, scenes["turntable"], [5], tmp_path / "b", key=key,
                       samples=None, resolution=None))
    assert second["reloaded"] is False and second["loads"] == first["loads"]
    ref = direct(bpy_env, scenes["turntable"], [5], tmp_path / "ref", "--resolution-percent", "20")
    np.testing.assert_array_equal(pixels(second["outputs"][0]["path"]), pixels(ref[0]["path"]))


def test_committed_sample_is_current(loop, rt, scenes, tmp_path):
    assert COMMITTED.stat().st_size < 1_000_000
    a = ok(render(loop, rt, COMMITTED, [7], tmp_path / "committed"))
    b = ok(render(loop, rt, scenes["turntable"], [7], tmp_path / "built"))
    np.testing.assert_array_equal(pixels(a["outputs"][0]["path"]), pixels(b["outputs"][0]["path"]),
                                  err_msg="rebuild sample_scenes/turntable.blend")


def test_malicious_scene_writes_nothing(loop, rt, scenes, bpy_env, tmp_path):
    marker, outdir = scenes["marker"], Path(str(scenes["marker"]) + "_fileoutput")
    events = render(loop, rt, scenes["malicious"], [1, 2], tmp_path)
    ok(events)
    assert not marker.exists() and not outdir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_0001.png", "frame_0002.png"]

    # Positive controls, so that the assertions above mean something: without
    # muting, the File Output nodes write even with scripts off; with
    # scripts on, the text block and the driver write the marker.
    armed, armed_out = scenes["armed_marker"], Path(str(scenes["armed_marker"]) + "_fileoutput")
    control = """
import bpy, os
bpy.ops.wm.open_mainfile(filepath={scene!r}, load_ui=False, use_scripts={scripts})
sc = bpy.context.scene
sc.render.resolution_percentage = 20; sc.cycles.samples = 1
sc.render.filepath = {out!r}
bpy.ops.render.render(write_still=True)
print(os.path.exists({marker!r}))
"""
    args = dict(scene=str(scenes["armed"]), out=str(tmp_path / "control.png"), marker=str(armed))
    assert run_bpy(control.format(scripts=False, **args), bpy_env).split()[-1] == "False"
    written = sorted(p.relative_to(armed_out).as_posix() for p in armed_out.rglob("*.png"))
    assert written == ["nested/stolen_Image.png", "stolen_Image.png"]
    assert run_bpy(control.format(scripts=True, **args), bpy_env).split()[-1] == "True"


@pytest.mark.parametrize("name", ["random", "truncated"])
def test_corrupt_blend_is_refused_and_runtime_survives(loop, rt, scenes, tmp_path, name):
    msg = refused(render(loop, rt, scenes[name], [1], tmp_path))
    assert "cannot open the scene as a .blend file" in msg and str(scenes[name]) in msg
    assert rt.alive
    ok(render(loop, rt, scenes["turntable"], [1], tmp_path))


def test_missing_scene_file(loop, rt, tmp_path):
    msg = refused(render(loop, rt, tmp_path / "nope.blend", [1], tmp_path, key="nope"))
    assert "not found" in msg


def test_missing_external_image_is_refused(loop, rt, scenes, tmp_path):
    msg = refused(render(loop, rt, scenes["missing_tex"], [1], tmp_path / "out"))
    # named as the creator wrote it, never by the worker's path (issue: refusals named cache paths)
    assert "'checker'" in msg and "'//textures/checker_missing.png'" in msg and str(scenes["missing_png"]) not in msg
    assert "missing" in msg and "Pack Resources" in msg
    assert not (tmp_path / "out").exists()


def test_linked_library_is_refused(loop, rt, scenes, tmp_path):
    msg = refused(render(loop, rt, scenes["linked"], [1], tmp_path))
    assert "links data from other .blend files" in msg and "'//turntable.blend'" in msg  # as written


def test_scene_without_camera_is_refused(loop, rt, scenes, tmp_path):
    assert "no active camera" in refused(render(loop, rt, scenes["no_camera"], [1], tmp_path))


@pytest.mark.parametrize("name, words", [
    ("osl", "Open Shading Language is not allowed"),
    ("vse", "sequencer strip 'plate' uses the external file"),
    ("gn_import", "imports a file by path"),
    ("fluid", "fluid domain 'Cube'"),
])
def test_other_file_access_is_refused(loop, rt, scenes, tmp_path, name, words):
    """Reading files by path (or writing fluid caches) needs no data-block and no script."""
    assert words in refused(render(loop, rt, scenes[name], [1], tmp_path))


@pytest.mark.parametrize("settings, words", [
    ({"resolution_percent": 32767}, "exceeds the farm cap"),
    ({"resolution": [20000, 100]}, "resolution must be"),
    ({"samples": 70000}, "exceed the farm cap"),
    ({"samples": 0}, "positive integer"),
    ({"format": "JPEG"}, "unsupported output format"),
    ({"color_depth": "32"}, "unsupported output format"),
    ({"tile": {"x": 0}}, "tile"),
    ({"resolution_percent": 100, "max_resolution": 256}, "cap of 256 px"),   # 320x240 > 256
])
def test_caps_and_bad_settings_are_refused(loop, rt, scenes, tmp_path, settings, words):
    assert words in refused(render(loop, rt, scenes["turntable"], [1], tmp_path, **settings))


def test_bad_requests_get_errors(loop, rt, scenes, tmp_path):
    bad = [{"op": "render", "scene": "relative.blend", "scene_key": "k", "frames": [1], "out_dir": str(tmp_path)},
           {"op": "render", "scene": str(scenes["turntable"]), "scene_key": "k", "frames": "1-3",
            "out_dir": str(tmp_path)},
           {"op": "fly"}]
    for payload in bad:
        refused(loop.run_until_complete(collect(rt, payload)))

    async def raw_lines():
        rt.proc.stdin.write(b"this is not json\n\xff\xfe\n[1, 2]\n")
        await rt.proc.stdin.drain()
        return [await rt._next_event() for _ in range(3)]
    for ev in loop.run_until_complete(raw_lines()):
        assert ev["event"] == "error" and ev["id"] is None and ev["retryable"] is False
    assert loop.run_until_complete(collect(rt, {"op": "ping"}))[0]["event"] == "pong"


def test_lock_is_free_after_caller_raises_on_error(loop, rt, tmp_path):
    bad = {"op": "render", "scene": "relative.blend", "scene_key": "k", "frames": [1], "out_dir": str(tmp_path)}

    async def scenario():
        agen = rt.request(bad)                       # still referenced: never finalized
        try:
            async for ev in agen:
                raise ValueError(ev["message"])      # the daemon's style: raise on "error"
        except ValueError as e:
            kept = e
        events = await asyncio.wait_for(collect(rt, {"op": "ping"}), 10)
        await agen.aclose()
        return kept, events
    kept, events = loop.run_until_complete(scenario())
    assert "absolute path" in str(kept) and events[0]["event"] == "pong"


def test_killed_child_raises_runtime_crashed(loop, scenes, tmp_path):
    proc = RuntimeProcess("worker.runtimes.blender", ["--gpus", "none"], tmp_path / "rt")

    async def scenario():
        ready = await proc.start()
        assert ready["gpu"] is False and ready["devices"][0]["type"] == "CPU"
        payload = {"op": "render", "scene": str(scenes["turntable"]), "scene_key": "k", "frames": [1, 2],
                   "out_dir": str(tmp_path / "out"),
                   "settings": {**SMALL, "samples": 4096, "resolution_percent": 100}}
        loop_ = asyncio.get_running_loop()
        loop_.call_later(1.0, os.kill, proc.pid, signal.SIGKILL)   # mid-render of frame 1
        t0 = time.monotonic()
        with pytest.raises(RuntimeCrashed) as info:
            async for ev in proc.request(payload):
                assert ev["event"] != "done"
        assert time.monotonic() - t0 < 5
        return info.value

    try:
        err = loop.run_until_complete(asyncio.wait_for(scenario(), 60))
    finally:
        loop.run_until_complete(proc.kill())
    assert err.returncode == -signal.SIGKILL and not proc.alive
    assert "Read blend" in err.stderr_tail           # the tail of the child's log
    with pytest.raises(RuntimeCrashed):
        loop.run_until_complete(collect(proc, {"op": "ping"}))


def test_gpu_flag_validation(tmp_path, bpy_env):
    res = subprocess.run([sys.executable, "-m", "worker.runtimes.blender", "--gpus", "x"],
                         env=bpy_env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "--gpus" in res.stderr
