"""Long-lived Blender child process of the worker daemon.

Responsibility: load untrusted .blend files safely and render frames of them,
driven by JSON-line requests from the parent (`worker.runtimes.process.RuntimeProcess`).
This is the only module of the project that imports `bpy` (scene_checks is handed it).

    python -m worker.runtimes.blender [--gpus all|none|0,1]

Protocol (one JSON object per line; replies on the original stdout):
    <- {"event":"ready","pid","bpy_version","engines","devices","gpu"}   once, at start
    -> {"op":"ping","id":N}                  <- {"event":"pong","id":N}
    -> {"op":"quit"}                         the process exits 0 (so does EOF on stdin)
    -> {"op":"render","id":N,"scene":ABS,"scene_key":SHA,"frames":[..],"out_dir":ABS,
        "project_root":ABS|null (the laid-out project tree holding "scene": paths inside it are
        allowed), "allow_missing":bool (files of the tree that are absent render pink),
        "settings":{"format","color_depth","samples","resolution_percent","resolution",
                    "tile","region","overscan","stamp_fps","passes"}}
       <- {"event":"frame","id":N,"frame":F,"path":ABS,"seconds":S}   after each frame
    "passes": ["depth","normal","mask"] also writes those passes of each whole frame, normalised for
       ControlNet (worker.runtimes.render_passes), as depth_FFFF.png… listed in "outputs".
    "tile": {"cols","rows","col","row","overscan"} renders one tile of one frame
       (farm.kinds.tiles geometry, row 0 at the top) to tile_FFFF_rR_cC.ext, cropped to
       exactly the tile; overscan null picks the margin from the scene
       (denoising, adaptive sampling). "stamp_fps": true writes the scene's
       frame rate into the image metadata ("Note": "renderhive fps=24/1"),
       which the video encoder reads.
    "region": [x0,x1,y0,y1] instead of "tile": renders exactly that rectangle
       (output pixels, origin top-left, ends exclusive) of one frame, by the
       same border/overscan/crop path as tiles (top-level "overscan": null or
       pixels), to region_FFFF_x0_x1_y0_y1.ext; its pixels equal the same
       rectangle of a full render wherever tiles are exact. Used to verify
       other workers' results. Both "tile" and "region": refused.
       <- {"event":"done","id":N,"outputs":[{"frame","path","seconds"}..],
           "reloaded":bool,"loads":int,"rss_bytes":int}
       <- {"event":"error","id":N|null,"message":str,"retryable":bool}  instead of done

Invariants:
- Nothing but protocol lines is written to the protocol fd: fd 1 is pointed at
  stderr before bpy is imported, so Blender's own prints cannot corrupt it.
- Scripts embedded in a scene never run: auto-execution is off in the
  preferences (re-set before every load, preferences survive loads) and every
  load passes use_scripts=False.
- A file is opened only when scene_key changes. Right after a load the file's
  own values of every optional override are recorded, and each task starts
  from them, so one task's settings never leak into the next.
- Tiles are bit-exact where the engine allows: the render border covers the
  tile plus its overscan; 8-bit PNG with dither is rendered into the
  full-size buffer (use_crop_to_border=False: Blender's dither noise depends
  on the buffer position) and cropped; other formats use a cropped buffer.
  Tiles never reload the scene (same scene_key) and EEVEE is refused.
  Regions take the same path (without the tile-grid checks), so a region
  equals the same rectangle of a full render bit for bit.
- Scene checks live in `worker.runtimes.scene_checks` (before opening, after
  opening, and after every frame_set); the OS sandbox of `worker.sandbox` is
  the defence, the checks make refusals readable.
- Scene faults (unreadable file, no camera, linked or external data, caps,
  more tiles than pixels, EEVEE tiles, regions outside the frame) give
  retryable=false with a message the creator can act on; a failure of
  Blender on a scene that passed the checks gives retryable=true.
- A bad request never kills the process; only "quit", EOF or a crash does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# The farm-wide caps (pixels per side after the percentage; samples). The
# coordinator validates requests against the same values; the worker checks
# again because the scene's own values count too.
from common import limits as L
from common.limits import MAX_RESOLUTION, MAX_SAMPLES, RENDER_PASSES
from common.tiles import tile_name, tile_rect, too_many_tiles
from worker import settings as C
from worker.runtimes import render_passes
from worker.runtimes import scene_checks as checks
from worker.runtimes.scene_checks import SceneError

GPU_TYPES = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")   # order of preference
# Optional overrides: recorded after each load so a task with null settings
# renders with the file's own values. Format fields are set on every task and
# need no record.
RECORDED = (("render", "resolution_x"), ("render", "resolution_y"),
            ("render", "resolution_percentage"), ("cycles", "samples"),
            ("eevee", "taa_render_samples"), ("render", "use_border"),
            ("render", "use_crop_to_border"), ("render", "border_min_x"),
            ("render", "border_max_x"), ("render", "border_min_y"),
            ("render", "border_max_y"), ("render", "use_stamp_note"),
            ("render", "stamp_note_text"))
# Engines whose tiles assemble exactly (EEVEE's screen-space effects see only
# the tile: up to 61/255 at the seams, and ~2.5 s of set-up per tile).
TILE_ENGINES = ("CYCLES", "BLENDER_WORKBENCH")
# Compositor nodes that pass pixels through unchanged; any other node may
# read neighbouring pixels or positions, which a tile does not have.
PASS_THROUGH_NODES = {"CompositorNodeRLayers", "NodeGroupOutput", "NodeGroupInput",
                      "CompositorNodeComposite", "CompositorNodeViewer", "NodeReroute",
                      "NodeFrame", "CompositorNodeOutputFile"}

bpy = None  # imported in main(), after the protocol fd is set aside


def region_name(frame: int, region: list, fmt: str) -> str:
    """Output name of a region render, e.g. ``region_0007_16_48_8_40.png`` (x0, x1, y0, y1)."""
    x0, x1, y0, y1 = region
    return f"region_{frame:04d}_{x0}_{x1}_{y0}_{y1}.{'exr' if fmt == 'EXR' else 'png'}"


class RenderFailed(Exception):
    """Blender failed on a scene that passed the checks: worth a retry."""


class Runtime:
    def __init__(self, proto, gpus: str):
        self.proto = proto
        self.scene_key: str | None = None
        self.root: str | None = None           # the laid-out project the loaded scene reads from
        self.allow_missing = False
        self.loads = 0
        self.recorded: dict[tuple[str, str], object] = {}
        self.recorded_passes: dict[str, tuple[bool, bool]] = {}  # view layer → the file's (use_pass_z, normal)
        self.devices, self.gpu = self._setup_devices(gpus)

    # ---- plumbing -------------------------------------------------------
    def emit(self, flush: bool = True, **event) -> None:
        self.proto.write(json.dumps(event) + "\n")
        if flush:
            self.proto.flush()

    def serve(self, stdin) -> int:
        engines = ["BLENDER_EEVEE", "BLENDER_WORKBENCH"] + [
            c.bl_idname for c in bpy.types.RenderEngine.__subclasses__() if getattr(c, "bl_idname", None)]
        self.emit(event="ready", pid=os.getpid(), bpy_version=bpy.app.version_string,
                  engines=engines, devices=self.devices, gpu=self.gpu)
        while True:
            line = stdin.readline()
            if not line:                       # parent gone: nothing left to serve
                return 0
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except ValueError as e:             # bad JSON or bad UTF-8
                self.emit(event="error", id=None, message=f"malformed request line: {e}", retryable=False)
                continue
            rid = req.get("id") if isinstance(req, dict) else None
            try:
                if not isinstance(req, dict):
                    raise SceneError("request must be a JSON object")
                op = req.get("op")
                if op == "quit":
                    return 0
                if op == "ping":
                    self.emit(event="pong", id=rid)
                elif op == "render":
                    self.render(rid, req)
                else:
                    raise SceneError(f"unknown op {op!r}")
            except SceneError as e:
                self.emit(event="error", id=rid, message=str(e), retryable=False)
            except RenderFailed as e:
                self.emit(event="error", id=rid, message=str(e), retryable=True)
            except Exception as e:                  # a bug here, not the scene's fault
                traceback.print_exc()
                self.scene_key = None               # state unknown: reload next time
                self.emit(event="error", id=rid, retryable=True,
                          message=f"internal error in the Blender runtime: {type(e).__name__}: {e}")

    # ---- devices --------------------------------------------------------
    def _setup_devices(self, spec: str):
        cprefs = bpy.context.preferences.addons["cycles"].preferences
        cpu_name = next((d[0] for d in cprefs.get_device_list("CPU") if d[1] == "CPU"), "CPU")
        cpu = [{"type": "CPU", "name": cpu_name, "id": "CPU"}]
        if spec == "none":
            cprefs.compute_device_type = "NONE"
            return cpu, False
        wanted = None if spec == "all" else [int(i) for i in spec.split(",")]
        for kind in GPU_TYPES:
            try:
                cprefs.compute_device_type = kind
            except TypeError:                   # backend not built for this platform
                continue
            gpus = [d for d in cprefs.get_devices_for_type(kind) if d.type == kind]
            if not gpus:
                continue
            chosen = range(len(gpus)) if wanted is None else wanted
            bad = [i for i in chosen if not 0 <= i < len(gpus)]
            if bad:
                raise SystemExit(f"--gpus {spec}: no {kind} device {bad}; there are {len(gpus)}")
            for d in cprefs.devices:            # includes CPU entries: no hybrid rendering
                d.use = False
            for i in chosen:
                gpus[i].use = True
            return [{"type": kind, "name": gpus[i].name, "id": gpus[i].id} for i in chosen], True
        print(f"blender_runtime: --gpus {spec}: no GPU found, rendering on the CPU", file=sys.stderr)
        cprefs.compute_device_type = "NONE"
        return cpu, False

    # ---- loading and checks ---------------------------------------------
    def _load(self, path: str, key: str, root: str | None = None, allow_missing: bool = False) -> None:
        self.scene_key = None                   # until loaded *and* checked
        self.root, self.allow_missing = root, allow_missing
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        if not os.path.isfile(path):
            raise SceneError(f"scene file not found on the worker: {path}")
        if root:  # every .blend of the tree: libraries load with the scene
            checks.check_project_files(root, _blend_cap())
        else:
            checks.check_file(path, _blend_cap())
        try:
            bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
        except RuntimeError as e:
            msg = str(e).strip().removeprefix("Error: ")
            raise SceneError(f"cannot open the scene as a .blend file ({msg}); "
                             "save it again with Blender and resubmit") from None
        self.loads += 1
        sc = bpy.context.scene
        self.recorded = {(o, a): getattr(getattr(sc, o), a) for o, a in RECORDED}
        self.recorded_passes = {vl.name: (vl.use_pass_z, vl.use_pass_normal) for vl in sc.view_layers}
        checks.check_loaded(bpy, sc, root)
        checks.check_frame(bpy, sc, sc.frame_current, root, allow_missing)  # as saved; again at each frame
        checks.mute_file_outputs(bpy)
        sc.render.use_persistent_data = True    # keeps BVH/shaders between frames
        self.scene_key = key

    # ---- rendering ------------------------------------------------------
    def _apply(self, sc, s: dict) -> str:
        r, im = sc.render, sc.render.image_settings
        for (o, a), v in self.recorded.items():
            setattr(getattr(sc, o), a, v)
        for vl in sc.view_layers:
            vl.use_pass_z, vl.use_pass_normal = self.recorded_passes.get(vl.name, (vl.use_pass_z, vl.use_pass_normal))
        fmt = s.get("format") or "PNG"
        depth = str(s.get("color_depth") or ("8" if fmt == "PNG" else "16"))
        if fmt == "PNG" and depth in {"8", "16"}:
            ext = ".png"
        elif fmt == "EXR" and depth in {"16", "32"}:
            ext = ".exr"
        else:
            raise SceneError(f"unsupported output format {fmt!r} with color_depth {depth!r} "
                             "(PNG: 8/16, EXR: 16/32)")
        im.media_type = "IMAGE"                 # 5.0: a VIDEO media type hides PNG/EXR
        im.file_format = "PNG" if fmt == "PNG" else "OPEN_EXR"
        im.color_mode = "RGBA"
        im.color_depth = depth
        if fmt == "EXR":
            im.exr_codec = "ZIP"
        samples, pct, res = s.get("samples"), s.get("resolution_percent"), s.get("resolution")
        if samples is not None:
            if type(samples) is not int or samples < 1:
                raise SceneError(f"samples must be a positive integer, got {samples!r}")
            if samples > MAX_SAMPLES:
                raise SceneError(f"samples {samples} exceed the farm cap of {MAX_SAMPLES}")
            sc.cycles.samples = sc.eevee.taa_render_samples = samples
        if pct is not None:
            if type(pct) is not int or not 1 <= pct <= 32767:
                raise SceneError(f"resolution_percent must be an integer 1..32767, got {pct!r}")
            r.resolution_percentage = pct
        if res is not None:
            if (not isinstance(res, list) or len(res) != 2
                    or any(type(v) is not int or not 4 <= v <= MAX_RESOLUTION for v in res)):
                raise SceneError(f"resolution must be [width, height], 4..{MAX_RESOLUTION}, got {res!r}")
            r.resolution_x, r.resolution_y = res
        # Caps apply to the effective values, the file's own ones included;
        # a job may ask for a tighter resolution cap ("max_resolution").
        cap = s.get("max_resolution") or MAX_RESOLUTION
        if type(cap) is not int or cap < 1:
            raise SceneError(f"max_resolution must be a positive integer, got {cap!r}")
        cap = min(cap, MAX_RESOLUTION)
        w, h = (v * r.resolution_percentage // 100 for v in (r.resolution_x, r.resolution_y))
        if max(w, h) > cap:
            raise SceneError(f"output size {w}x{h} exceeds the farm cap of {cap} px per side; "
                             "lower the resolution or its percentage")
        eng_samples = {"CYCLES": sc.cycles.samples, "BLENDER_EEVEE": sc.eevee.taa_render_samples}
        if eng_samples.get(r.engine, 0) > MAX_SAMPLES:
            raise SceneError(f"{eng_samples[r.engine]} samples exceed the farm cap of {MAX_SAMPLES}")
        sc.cycles.device = "GPU" if self.gpu else "CPU"
        r.threads_mode = "FIXED" if C.RENDER_THREADS > 0 else "AUTO"   # the worker, not the scene
        if C.RENDER_THREADS > 0:
            r.threads = C.RENDER_THREADS
        if s.get("stamp_fps") and not r.use_stamp:  # metadata only; a burnt-in stamp would change pixels
            r.use_stamp_note = True
            r.stamp_note_text = f"renderhive fps={r.fps}/{r.fps_base:.6g}"
        r.use_stamp_hostname = False            # don't leak the worker's identity in metadata
        r.use_stamp_filename = False
        return ext

    def _part(self, sc, s: dict, frames: list) -> dict | None:
        """Check a tile or region request and set the render border to its
        rectangle plus the overscan (one code path for both, so a region is
        exact wherever tiles are). Returns the output file name, the rectangle
        and the crop that turns the written file into exactly the rectangle
        (None: the file is the rectangle already); None for a whole frame."""
        tile, region = s.get("tile"), s.get("region")
        if tile is None and region is None:
            return None                         # border: the scene's own, restored by _apply
        if tile is not None and region is not None:
            raise SceneError("a request renders either a 'tile' or a 'region', not both")
        r = sc.render
        w, h = (v * r.resolution_percentage // 100 for v in (r.resolution_x, r.resolution_y))
        fmt = s.get("format") or "PNG"
        if tile is not None:
            keys = ("cols", "rows", "col", "row")
            if not isinstance(tile, dict) or any(type(tile.get(k)) is not int for k in keys):
                raise SceneError(f"'tile' must be {{cols, rows, col, row: integers, overscan}}, got {tile!r}")
            cols, rows, col, row = (tile[k] for k in keys)
            top = L.MAX_TILES_PER_SIDE
            if not (1 <= cols <= top and 1 <= rows <= top and 0 <= col < cols and 0 <= row < rows):
                raise SceneError(f"tile {col},{row} of {cols}x{rows} is not in a grid of 1..{top} tiles a side")
            overscan, what = tile.get("overscan"), "tile"
        else:
            if (not isinstance(region, list) or len(region) != 4
                    or any(type(v) is not int for v in region)):
                raise SceneError(f"'region' must be [x0, x1, y0, y1] (integer pixels), got {region!r}")
            overscan, what = s.get("overscan"), "region"
        if overscan is not None and (type(overscan) is not int or not 0 <= overscan <= L.MAX_TILE_OVERSCAN):
            raise SceneError(f"overscan must be 0..{L.MAX_TILE_OVERSCAN} pixels, got {overscan!r}")
        if len(frames) != 1:
            raise SceneError(f"a {what} request renders exactly one frame")
        if r.engine not in TILE_ENGINES:
            raise SceneError(f"{what}s are not supported for the {r.engine} engine: its screen-space effects "
                             "make tiles that do not match at the seams (EEVEE: up to 61/255). " +
                             ("Submit this scene without tiles (its frames still spread over the workers), or "
                              "switch it to Cycles or Workbench" if what == "tile" else
                              "Render the whole frame instead of a region"))
        tree = getattr(sc, "compositing_node_group", None)
        if r.use_compositing and tree is not None:
            spatial = sorted(n.name for n in tree.nodes if n.bl_idname not in PASS_THROUGH_NODES and not n.mute)
            if spatial:
                raise SceneError("the compositor works on whole frames (nodes " + ", ".join(spatial[:5])
                                 + f"), so {what}s would not match at the seams: " +
                                 ("submit without tiles, or turn off Output Properties > Post Processing > "
                                  "Compositing" if what == "tile" else "render the whole frame instead"))
        if tile is not None:
            problem = too_many_tiles(cols, rows, w, h)
            if problem:
                raise SceneError(problem)
            x0, x1, y0, y1 = tile_rect(cols, rows, col, row, w, h)
            name = tile_name(frames[0], row, col, fmt)
        else:
            x0, x1, y0, y1 = region
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise SceneError(f"region {region} is empty or outside the {w}x{h} frame: it must be "
                                 f"[x0, x1, y0, y1] with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} "
                                 "(output pixels, origin top-left, ends exclusive)")
            name = region_name(frames[0], region, fmt)
        m = self._auto_overscan(sc) if overscan is None else overscan
        rx0, rx1, ry0, ry1 = max(0, x0 - m), min(w, x1 + m), max(0, y0 - m), min(h, y1 + m)
        im = r.image_settings
        # Dithered 8-bit output must be quantised in the full-size buffer,
        # where the dither noise matches the untiled render's.
        full = im.file_format == "PNG" and im.color_depth == "8" and r.dither_intensity > 0
        r.use_border, r.use_crop_to_border = True, not full
        # Blender truncates border * size to whole pixels; a quarter pixel
        # keeps float rounding (1/3 in float32...) from landing one short.
        r.border_min_x, r.border_max_x = (rx0 + 0.25) / w, (rx1 + 0.25) / w
        r.border_min_y, r.border_max_y = (h - ry1 + 0.25) / h, (h - ry0 + 0.25) / h  # y from the bottom
        ox, oy = (0, 0) if full else (rx0, ry0)
        crop = None if (not full and (rx0, rx1, ry0, ry1) == (x0, x1, y0, y1)) else \
            (x0 - ox, x1 - ox, y0 - oy, y1 - oy)
        return {"name": name, "rect": (x0, x1, y0, y1), "overscan": m, "crop": crop}

    @staticmethod
    def _auto_overscan(sc) -> int:
        """The margin that makes this scene's tiles match (see farm.constants)."""
        if sc.render.engine != "CYCLES":
            return 0
        if sc.cycles.use_denoising:
            return C.TILE_OVERSCAN_DENOISE
        if not sc.cycles.use_adaptive_sampling:
            return 0
        margin, samples = C.TILE_OVERSCAN_ADAPTIVE, C.TILE_OVERSCAN_ADAPTIVE_SAMPLES
        while sc.cycles.samples > samples and margin < C.TILE_OVERSCAN_DENOISE:
            margin, samples = margin * 2, samples * 4   # more convergence checks reach further
        return margin

    @staticmethod
    def _crop(src: str, dst: str, box) -> None:
        from common import rasters
        try:
            rasters.write(dst, rasters.read(src).crop(*box))
        except (rasters.RasterError, OSError) as e:
            raise RenderFailed(f"cannot crop the rendered tile: {e}") from None
        os.remove(src)

    def render(self, rid, req: dict) -> None:
        t_request = time.time()  # wall clock, comparable with the daemon's and coordinator's (bench --phases)
        scene, key, frames, out_dir = (req.get(k) for k in ("scene", "scene_key", "frames", "out_dir"))
        settings = req.get("settings") or {}
        if not isinstance(scene, str) or not os.path.isabs(scene):
            raise SceneError(f"'scene' must be an absolute path, got {scene!r}")
        if not isinstance(key, str) or not key:
            raise SceneError("'scene_key' must be a non-empty string")
        if not isinstance(out_dir, str) or not os.path.isabs(out_dir):
            raise SceneError(f"'out_dir' must be an absolute path, got {out_dir!r}")
        if (not isinstance(frames, list) or not frames
                or any(type(f) is not int for f in frames)):
            raise SceneError(f"'frames' must be a non-empty list of integers, got {frames!r}")
        if not isinstance(settings, dict):
            raise SceneError("'settings' must be an object")
        root = req.get("project_root")
        if root is not None and (not isinstance(root, str) or not os.path.isabs(root)
                                 or os.path.realpath(root) != root or not scene.startswith(root + os.sep)):
            raise SceneError("'project_root' must be the real absolute folder that holds 'scene'")
        key = f"{key}@{root}" if root else key   # the same project laid out elsewhere resolves elsewhere
        reloaded = key != self.scene_key
        if reloaded:
            self._load(scene, key, root, bool(req.get("allow_missing")))
        sc = bpy.context.scene
        ext = self._apply(sc, settings)
        part = self._part(sc, settings, frames)  # a tile or a region of the frame, or None
        passes = settings.get("passes") or []
        if not isinstance(passes, list) or not set(passes) <= set(RENDER_PASSES):
            raise SceneError(f"passes must be a list of {', '.join(RENDER_PASSES)}, got {passes!r}")
        if passes and part is not None:
            raise SceneError("render passes are written for whole frames only: leave out tiles or regions")
        layer = bpy.context.view_layer
        if passes:
            render_passes.enable(layer, passes)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:                    # the worker's disk, not the scene
            raise RenderFailed(f"cannot create the output folder: {e}") from None
        outputs = []
        t_ready = time.time()
        for f in frames:
            t_frame = time.time()
            sc.frame_set(f)
            if sc.camera is None:               # camera markers can switch it per frame
                raise SceneError(f"scene {sc.name!r} has no active camera at frame {f}")
            checks.check_frame(bpy, sc, f, self.root, self.allow_missing)  # what keyframes and drivers turned on
            if part is None:
                path = render_path = os.path.join(out_dir, f"frame_{f:04d}{ext}")
            else:
                path = os.path.join(out_dir, part["name"])
                render_path = path if part["crop"] is None else os.path.join(out_dir, f".region{ext}")
            sc.render.filepath = render_path    # always ours, never the scene's
            for stale in {path, render_path}:   # a stale file must not pass for output
                if os.path.exists(stale):
                    os.remove(stale)
            t_call = time.time()
            t0 = time.perf_counter()
            try:
                bpy.ops.render.render(animation=False, write_still=True)
            except RuntimeError as e:
                raise RenderFailed(f"render of frame {f} failed: {str(e).strip()}") from None
            if not os.path.isfile(render_path):
                raise RenderFailed(f"render of frame {f} reported success but wrote no file")
            if render_path != path:
                self._crop(render_path, path, part["crop"])
            seconds = round(time.perf_counter() - t0, 4)
            outputs.append({"frame": f, "path": path, "seconds": seconds})
            # when the request came, its setup ended (scene load, settings), the frame began (frame_set,
            # checks), the render call began and ended: where a frame's time outside render() goes
            # the last frame's event leaves with "done" (one write, one wake-up of the daemon: that wake-up
            # is on the path to the next task's render; bench/overhead.py --phases measured ~4 ms under load)
            self.emit(f != frames[-1], event="frame", id=rid, **outputs[-1],
                      marks=[t_request, t_ready, t_frame, t_call, time.time()])
            t_request = t_ready = None
            if passes:  # from the same render result: no second render
                try:
                    outputs += [{"frame": f, "path": p, "seconds": 0.0}
                                for p in render_passes.write(bpy, sc, layer.name, out_dir, f, passes)]
                except KeyError as e:  # the active view layer left out of the render
                    raise SceneError(f"view layer {layer.name!r} has no {e} pass in the render: turn on its "
                                     "'Use for Rendering' (or make a rendered layer active) and resubmit") from None
                except (OSError, RuntimeError) as e:
                    raise RenderFailed(f"cannot write the render passes of frame {f}: {e}") from None
        self.emit(event="done", id=rid, outputs=outputs, reloaded=reloaded,
                  loads=self.loads, rss_bytes=_rss_bytes())


def _blend_cap() -> int:
    """Largest decompressed .blend this child loads: half of its memory limit (the sandbox's RLIMIT_DATA),
    at most the farm-wide cap."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return min(L.MAX_BLEND_BYTES, soft // 2) if soft != resource.RLIM_INFINITY else L.MAX_BLEND_BYTES


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:                             # not Linux: peak instead of current
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.runtimes.blender")
    ap.add_argument("--gpus", default="all", help="all | none | comma-separated GPU indices")
    args = ap.parse_args(argv)
    if args.gpus not in {"all", "none"} and not all(p.isdigit() for p in args.gpus.split(",")):
        ap.error("--gpus must be all, none or indices like 0,1")
    # Set the protocol stream aside *before* bpy exists: from here on fd 1
    # (C printf, Python print) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    global bpy
    import bpy as _bpy
    bpy = _bpy
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    return Runtime(proto, args.gpus).serve(sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
