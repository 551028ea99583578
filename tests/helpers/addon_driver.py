"""Drive the Renderhive Blender add-on in bpy module mode, one scenario group per process.

    python tests/helpers/addon_driver.py SCENARIO '{"json": "arguments"}'

Prints one JSON line (the scenario's observations) as the last line of stdout; bpy's own chatter goes
to stderr. Run it with BLENDER_USER_RESOURCES, XDG_CACHE_HOME and TMPDIR pointing at scratch folders
(tests/client/test_addon.py does), so that installed extensions and temporary files can be checked.

The add-on is loaded either as a legacy add-on from a folder on ``sys.path`` (``addons`` argument,
``addon_utils.enable(..., default_set=True)``) or installed from the built zip (``zip`` argument,
``bpy.ops.extensions.package_install_files``). The repository's ``client`` package is made
unimportable, as it is inside a user's Blender, so the add-on must use its own copy of the API client.
Nothing here asserts: the test does, on the JSON.
"""
from __future__ import annotations

import hashlib
import importlib.abc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]


class _NoClientPackage(importlib.abc.MetaPathFinder):
    """Inside Blender the repository is not importable: make sure the add-on does not rely on it."""

    def find_spec(self, name, path=None, target=None):
        if name == "client" or name.startswith("client."):
            raise ImportError(f"{name} is not importable inside Blender")
        return None


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else ""


def fingerprint(bpy) -> dict:
    """The user's session as the tests compare it before and after a submission."""
    sc = bpy.context.scene
    return {"filepath": bpy.data.filepath, "file_sha256": sha256(bpy.data.filepath),
            "is_dirty": bpy.data.is_dirty, "is_saved": bpy.data.is_saved,
            "ids": {a: sorted(i.name for i in getattr(bpy.data, a)) for a in
                    ("objects", "meshes", "materials", "images", "scenes", "libraries", "fonts", "sounds",
                     "texts", "node_groups", "window_managers")},
            "images": {i.name: [i.filepath, i.source, len(i.packed_files)] for i in bpy.data.images},
            "render": [sc.render.filepath, sc.render.resolution_percentage, sc.frame_current,
                       sc.render.image_settings.file_format]}


def renderhive_temp_dirs() -> list[str]:
    return sorted(str(p) for p in Path(tempfile.gettempdir()).glob("renderhive-*"))


# ------------------------------------------------------------------ loading the add-on
def load_addon(bpy, args: dict) -> str:
    import addon_utils
    if args.get("zip"):
        bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default",
                                                 enable_on_install=True)
        module = "bl_ext.user_default.renderhive"
    else:
        sys.path.insert(0, args["addons"])
        module = "renderhive"
        addon_utils.enable(module, default_set=True)
    return module


def configure(bpy, module: str, url: str, token: str, out: str = "") -> None:
    p = bpy.context.preferences.addons[module].preferences
    p.url, p.token = url, token
    if out:
        p.output_folder = out


def settings(bpy, **values) -> None:
    s = bpy.context.scene.renderhive
    for key, value in values.items():
        setattr(s, key, value)


def call(op, **kw) -> dict:
    """Run an operator's execute(); an error report comes back as RuntimeError in module mode."""
    t = time.monotonic()
    try:
        result = op(**kw)
        return {"result": sorted(result), "error": "", "seconds": round(time.monotonic() - t, 2)}
    except RuntimeError as exc:
        return {"result": ["ERROR"], "error": str(exc), "seconds": round(time.monotonic() - t, 2)}


def open_blend(bpy, path: str) -> None:
    bpy.ops.wm.open_mainfile(filepath=path, use_scripts=False)


# ------------------------------------------------------------------ drawing with a checking layout
class _OpProps:
    """What ``layout.operator()`` returns: accepts only the operator's own properties."""

    def __init__(self, bpy, idname: str):
        mod, name = idname.split(".")
        object.__setattr__(self, "_props", set(getattr(getattr(bpy.ops, mod), name).get_rna_type().properties.keys()))
        object.__setattr__(self, "_idname", idname)

    def __setattr__(self, key, value):
        if key not in self._props:
            raise AttributeError(f"operator {self._idname} has no property {key!r}")


class CheckingLayout:
    """A working fake of UILayout: every call is checked against UILayout's RNA description."""

    def __init__(self, bpy, calls: list):
        object.__setattr__(self, "_bpy", bpy)
        object.__setattr__(self, "_calls", calls)

    def __setattr__(self, key, value):
        if key not in self._bpy.types.UILayout.bl_rna.properties:
            raise AttributeError(f"UILayout has no attribute {key!r}")

    def __getattr__(self, name):
        bpy = self._bpy
        fn = bpy.types.UILayout.bl_rna.functions.get(name)
        if fn is None:
            raise AttributeError(f"UILayout has no function {name!r}")

        def method(*args, **kw):
            params = fn.parameters
            for key, value in kw.items():
                if key not in params:
                    raise TypeError(f"UILayout.{name}() has no argument {key!r}")
                if key == "icon" and value not in params["icon"].enum_items.keys():
                    raise ValueError(f"unknown icon {value!r}")
            if name == "prop" and args[1] not in args[0].bl_rna.properties:
                raise AttributeError(f"{args[0]} has no property {args[1]!r}")
            self._calls.append(name)
            if name == "operator":
                mod, op = args[0].split(".")
                getattr(getattr(bpy.ops, mod), op).get_rna_type()   # KeyError if it does not exist
                return _OpProps(bpy, args[0])
            if name in ("row", "column", "box", "split", "column_flow", "grid_flow"):
                return CheckingLayout(bpy, self._calls)
            return None
        return method


def draw_panels(bpy, module: str) -> list[str]:
    panel = sys.modules[f"{module}.panel"]
    calls: list[str] = []
    state = bpy.context.window_manager.renderhive
    state.set_jobs([{"id": 7, "name": "shot", "status": "active", "progress": 0.5, "frames_done": 1,
                     "frames_total": 2, "error": ""},
                    {"id": 6, "name": "old", "status": "failed", "progress": 0.0, "frames_done": 0,
                     "frames_total": 2, "error": "no camera"}])
    for busy in (False, True):
        state.busy, state.status_text, state.last_error, state.last_warning = busy, "uploading", "an error", "w"
        for cls in panel.CLASSES:
            cls.draw(SimpleNamespace(layout=CheckingLayout(bpy, calls)), bpy.context)
    state.busy, state.last_error, state.last_warning = False, "", ""
    state.jobs.clear()
    return calls


# ------------------------------------------------------------------ scenarios
def handlers_snapshot(bpy) -> dict:
    return {name: len(getattr(bpy.app.handlers, name)) for name in dir(bpy.app.handlers)
            if isinstance(getattr(bpy.app.handlers, name), list)}


def registered(bpy, module: str) -> dict:
    """Which of the add-on's classes are registered, and whether its RNA properties exist."""
    classes = [c for name in ("props", "operators", "panel") for c in sys.modules[f"{module}.{name}"].CLASSES]
    return {"classes": sorted(c.__name__ for c in classes if c.is_registered),
            "in_bpy_types": sorted(c.__name__ for c in classes if getattr(bpy.types, c.__name__, None) is not None),
            "scene_prop": hasattr(bpy.types.Scene, "renderhive"),
            "wm_prop": hasattr(bpy.types.WindowManager, "renderhive")}


def scenario_lifecycle(bpy, args: dict) -> dict:
    """Enable and disable twice; prefs reachable; panels draw; nothing leaks."""
    import addon_utils
    sys.path.insert(0, args["addons"])
    before = {"handlers": handlers_snapshot(bpy), "threads": len(threading.enumerate()),
              "scene_prop": hasattr(bpy.types.Scene, "renderhive")}
    rounds = []
    for _ in range(2):
        addon_utils.enable("renderhive", default_set=True)
        mod = sys.modules["renderhive"]
        configure(bpy, "renderhive", "http://127.0.0.1:9", "t0k3n", "/tmp/x")
        prefs = bpy.context.preferences.addons["renderhive"].preferences
        mod.operators.follow()
        on = {"registered": registered(bpy, "renderhive"), "prefs": [prefs.url, prefs.token, prefs.output_folder],
              "timer": bpy.app.timers.is_registered(mod.operators._follow_tick),
              "api_module": mod.remote.api.__name__, "api_file": mod.remote.api.__file__,
              "draw_calls": len(draw_panels(bpy, "renderhive")),
              "frames_default": bpy.context.scene.renderhive.frames_spec(bpy.context.scene)}
        tick = mod.operators._follow_tick
        addon_utils.disable("renderhive", default_set=True)
        on["after"] = {"registered": registered(bpy, "renderhive"), "handlers": handlers_snapshot(bpy),
                       "timer": bpy.app.timers.is_registered(tick), "threads": len(threading.enumerate()),
                       "enabled": "renderhive" in bpy.context.preferences.addons}
        rounds.append(on)
    return {"before": before, "rounds": rounds,
            "client_imported": any(m == "client" or m.startswith("client.") for m in sys.modules)}


def _submit_and_fetch(bpy, module: str, blend: str, frames: str, **extra) -> dict:
    open_blend(bpy, blend)
    settings(bpy, frames=frames, chunk=2, samples=4, resolution_percent=20, **extra)
    before = fingerprint(bpy)
    sub = call(bpy.ops.renderhive.submit)
    state = bpy.context.window_manager.renderhive
    out = {"submit": sub, "job_id": state.last_job_id, "before": before, "after": fingerprint(bpy),
           "temp_after_submit": renderhive_temp_dirs()}
    if sub["error"]:
        return out
    # the creator reviews and approves (on the approval page; here through the API), then fetches
    prefs = bpy.context.preferences.addons[module].preferences
    api = sys.modules[f"{module}.remote"].api.Client(prefs.url, prefs.token)
    out["early_fetch"] = None
    deadline = time.monotonic() + 240
    while api.job(state.last_job_id)["status"] not in ("rendered", "failed", "canceled") and time.monotonic() < deadline:
        time.sleep(0.2)
    if api.job(state.last_job_id)["status"] == "rendered":
        out["early_fetch"] = call(bpy.ops.renderhive.fetch_results, job_id=state.last_job_id)
        api.approve(state.last_job_id)
    out["fetch"] = call(bpy.ops.renderhive.fetch_results, job_id=state.last_job_id, wait=True, timeout=240)
    out["fetch_dir"] = state.last_fetch_dir
    out["files"] = sorted(p.name for p in Path(state.last_fetch_dir).glob("*")) if state.last_fetch_dir else []
    out["libraries"] = [[lib.filepath, lib.packed_file is not None] for lib in bpy.data.libraries]
    imgs = [i for i in bpy.data.images if i.get("renderhive_job") == state.last_job_id]
    out["images"] = [{"name": i.name, "source": i.source, "filepath": i.filepath} for i in imgs]
    out["jobs_listed"] = [j.job_id for j in state.jobs]
    return out


def run_modal(bpy, module: str, esc: bool) -> dict:
    """Drive the submit operator's modal code with a stand-in for the operator instance."""
    remote, ops = sys.modules[f"{module}.remote"], sys.modules[f"{module}.operators"]

    class Probe(ops._Remote):
        finish = ops.RENDERHIVE_OT_submit.finish

        def __init__(self):
            self.reports = []

        def report(self, kind, text):
            self.reports.append([sorted(kind)[0], text])

        def apply(self, context, msg):   # record every status the UI showed, not only the last of a batch
            super().apply(context, msg)
            statuses.add(context.window_manager.renderhive.status_text)

    statuses: set = set()
    results: list = []
    op, ctx = Probe(), bpy.context
    req = ops.RENDERHIVE_OT_submit.request(None, ctx)
    op.begin(ctx, remote.Runner(remote.submit, req).start())
    if esc:
        results.append(sorted(op.modal(ctx, SimpleNamespace(type="ESC", value="PRESS"))))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        result = op.modal(ctx, SimpleNamespace(type="TIMER", value="NOTHING"))
        if result != {"RUNNING_MODAL"}:
            results.append(sorted(result))
            break
        time.sleep(0.02)
    state = ctx.window_manager.renderhive
    return {"results": results, "reports": op.reports, "statuses": sorted(statuses - {""}),
            "busy_after": state.busy, "job_id": state.last_job_id, "temp_exists": renderhive_temp_dirs() != [],
            "pass_through": sorted(op.modal(ctx, SimpleNamespace(type="MOUSEMOVE", value="NOTHING")))}


def scenario_submit(bpy, args: dict) -> dict:
    """Real farm and worker: submit and fetch (sample scene, external texture), a failing job, a cancel."""
    sys.path.insert(0, str(REPO / "sample_scenes"))
    import build_samples
    # the turntable with its texture as an external file next to it, by a relative path
    tex = Path(args["work"]) / "textures" / "checker.png"
    tex.parent.mkdir(parents=True, exist_ok=True)
    ext_blend = str(build_samples.build_external_texture(Path(args["work"]) / "ext" / "ext.blend", tex))
    img = bpy.data.images.new("tex", 16, 16)
    img.pixels.foreach_set([0.2, 0.6, 0.9, 1.0] * 256)
    img.filepath_raw, img.file_format = str(tex), "PNG"
    img.save()
    open_blend(bpy, ext_blend)
    bpy.data.images["checker"].filepath = "//../textures/checker.png"
    bpy.ops.wm.save_mainfile()
    # an object linked (not appended) from another .blend
    lib = build_samples.build_turntable(Path(args["work"]) / "linked" / "library.blend")
    linked_blend = str(build_samples.build_linked(Path(args["work"]) / "linked" / "shot.blend", lib))
    sys.meta_path.insert(0, _NoClientPackage())
    module = load_addon(bpy, args)
    configure(bpy, module, args["url"], args["token"], args["out"])
    res = {"module": module, "sample": _submit_and_fetch(bpy, module, args["blend"], "1-3"),
           "external": _submit_and_fetch(bpy, module, ext_blend, "2", project_root=args["work"]),
           "linked": _submit_and_fetch(bpy, module, linked_blend, "4")}
    # a job the worker refuses (no camera): the fetch waits for it and reports why it failed (the farm
    # renders the file as saved: the camera-less scene is saved under another name first)
    open_blend(bpy, args["blend"])
    bpy.context.scene.camera = None
    bpy.ops.wm.save_as_mainfile(filepath=str(Path(args["blend"]).with_name("nocam.blend")))
    settings(bpy, frames="1", samples=4, resolution_percent=20)
    res["failing_submit"] = call(bpy.ops.renderhive.submit)
    res["failing_job_id"] = bpy.context.window_manager.renderhive.last_job_id
    res["failing_fetch"] = call(bpy.ops.renderhive.fetch_results, wait=True, timeout=240)
    # the UI path: the operator's own modal() and apply() on a Runner thread, fed timer events as
    # Blender would (module mode has no event loop); once with Esc at once, once to the end
    open_blend(bpy, args["blend"])
    settings(bpy, frames="1")
    res["canceled"] = run_modal(bpy, module, esc=True)
    res["threaded"] = run_modal(bpy, module, esc=False)
    res["temp_dirs"] = renderhive_temp_dirs()
    res["client_imported"] = any(m == "client" or m.startswith("client.") for m in sys.modules)
    return res


def scenario_errors(bpy, args: dict) -> dict:
    """Never saved, unreachable, wrong token, no token, offline, missing texture, unknown job."""
    sys.path.insert(0, str(REPO / "sample_scenes"))
    import build_samples
    missing_blend = str(build_samples.build_external_texture(Path(args["work"]) / "missing" / "m.blend",
                                                            Path(args["work"]) / "nowhere" / "tex.png"))
    bpy.ops.wm.read_homefile(use_empty=True)
    sys.meta_path.insert(0, _NoClientPackage())
    module = load_addon(bpy, args)
    res = {}
    configure(bpy, module, args["url"], args["token"], args["out"])
    res["never_saved"] = {"call": call(bpy.ops.renderhive.submit), "fingerprint": fingerprint(bpy)}
    open_blend(bpy, args["blend"])
    before = fingerprint(bpy)
    settings(bpy, frames="1")
    cases = {"unreachable": (args["dead_url"], args["token"]), "wrong_token": (args["url"], "not-a-token"),
             "no_token": (args["url"], ""), "offline": ("http://farm.renderhive.example:8000", args["token"])}
    for name, (url, token) in cases.items():
        configure(bpy, module, url, token)
        res[name] = {"call": call(bpy.ops.renderhive.submit), "temp": renderhive_temp_dirs()}
    configure(bpy, module, args["dead_url"], args["token"])
    res["unreachable_refresh"] = call(bpy.ops.renderhive.refresh)
    configure(bpy, module, args["url"], args["token"])
    res["fetch_unknown"] = call(bpy.ops.renderhive.fetch_results, job_id=999999)
    res["fetch_nothing"] = call(bpy.ops.renderhive.fetch_results)
    res["after"] = fingerprint(bpy)
    res["before"] = before
    open_blend(bpy, missing_blend)
    res["missing_texture"] = {"call": call(bpy.ops.renderhive.submit), "temp": renderhive_temp_dirs()}
    res["last_job_id"] = bpy.context.window_manager.renderhive.last_job_id
    res["temp_dirs"] = renderhive_temp_dirs()
    return res


def scenario_installed(bpy, args: dict) -> dict:
    """The zip built by `make addon`, installed offline: its operators work, with its own API client."""
    import addon_utils
    sys.meta_path.insert(0, _NoClientPackage())
    module = load_addon(bpy, args)
    res = {"module": module, "enabled": module in bpy.context.preferences.addons,
           "installed_files": sorted(p.name for p in Path(bpy.utils.user_resource("EXTENSIONS"),
                                                         "user_default", "renderhive").glob("*"))}
    addon_utils.disable(module, default_set=True)
    addon_utils.enable(module, default_set=True)
    res["registered"] = registered(bpy, module)
    res["api_module"] = sys.modules[f"{module}.remote"].api.__name__
    configure(bpy, module, args["url"], args["token"], args["out"])
    open_blend(bpy, args["blend"])
    settings(bpy, frames="1-2", tiles=args.get("tiles", ""), min_tier="trusted")
    res["submit"] = call(bpy.ops.renderhive.submit)
    res["job_id"] = bpy.context.window_manager.renderhive.last_job_id
    res["warning"] = bpy.context.window_manager.renderhive.last_warning
    state = bpy.context.window_manager.renderhive
    res["estimate"] = call(bpy.ops.renderhive.estimate)
    res["estimate_shown"] = [state.estimate_text, state.deposit_text, state.estimate_for]
    # the follow timer's function, called as bpy.app.timers would (module mode has no event loop)
    ops = sys.modules[f"{module}.operators"]
    state.jobs.clear()
    ops._follower.wanted = True
    ticks, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline and (not ticks or ticks[-1] != ops.FOLLOW_INTERVAL):
        ticks.append(ops._follow_tick())
        time.sleep(0.05)
    res["follow"] = {"first": ticks[0], "last": ticks[-1], "jobs": [(j.job_id, j.status) for j in state.jobs]}
    res["refresh"] = call(bpy.ops.renderhive.refresh)
    res["jobs"] = [(j.job_id, j.status) for j in bpy.context.window_manager.renderhive.jobs]
    res["draw_calls"] = len(draw_panels(bpy, module))
    res["temp_dirs"] = renderhive_temp_dirs()
    res["client_imported"] = any(m == "client" or m.startswith("client.") for m in sys.modules)
    return res


def scenario_project(bpy, args: dict) -> dict:
    """A project (tests/helpers/make_project.py) submitted through the UI path (modal, a runner thread), then
    resubmitted after one texture changed; the frames are fetched after the test approves."""
    sys.meta_path.insert(0, _NoClientPackage())
    module = load_addon(bpy, args)
    configure(bpy, module, args["url"], args["token"], args["out"])
    open_blend(bpy, args["blend"])
    settings(bpy, frames="1-3", chunk=1)
    before = fingerprint(bpy)
    res = {"first": run_modal(bpy, module, esc=False), "before": before, "after": fingerprint(bpy)}
    tex = Path(args["blend"]).parent / "tex" / "a.png"
    tex.write_bytes(tex.read_bytes() + b"\0")   # trailing bytes after IEND: a new blob, the same image
    res["again"] = run_modal(bpy, module, esc=False)
    prefs = bpy.context.preferences.addons[module].preferences
    api = sys.modules[f"{module}.remote"].api.Client(prefs.url, prefs.token)
    first = res["first"]["job_id"]
    deadline = time.monotonic() + 240
    while api.job(first)["status"] not in ("rendered", "failed", "canceled") and time.monotonic() < deadline:
        time.sleep(0.2)
    if api.job(first)["status"] == "rendered":
        api.approve(first)
    res["fetch"] = call(bpy.ops.renderhive.fetch_results, job_id=first, wait=True, timeout=240)
    res["fetch_dir"] = bpy.context.window_manager.renderhive.last_fetch_dir
    res["temp_dirs"] = renderhive_temp_dirs()
    res["project_module"] = sys.modules[f"{module}.remote"].project.__file__
    res["client_imported"] = any(m == "client" or m.startswith("client.") for m in sys.modules)
    return res


SCENARIOS = {"lifecycle": scenario_lifecycle, "submit": scenario_submit, "errors": scenario_errors,
             "installed": scenario_installed, "project": scenario_project}


def main() -> int:
    name, args = sys.argv[1], json.loads(sys.argv[2])
    out = os.fdopen(os.dup(1), "w")   # keep bpy's chatter off stdout, which carries our one JSON line
    os.dup2(2, 1)
    import bpy
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    result = SCENARIOS[name](bpy, args)
    out.write(json.dumps(result, default=str) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
