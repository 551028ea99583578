"""Reference renderer for tests: render frames of a .blend directly with bpy.

    python tests/helpers/direct_render.py SCENE OUT_DIR --frames 1,2
        [--format PNG|EXR] [--color-depth 8|16|32] [--samples N]
        [--resolution-percent P] [--resolution W H]

Writes OUT_DIR/frame_0001.png (or .exr) and so on, and prints one JSON line
{"outputs": [{"frame", "path", "seconds"}, ...]} on stdout. It is the plain
way to render (open once, frame_set, render with write_still), with none of
the worker's machinery (no persistent data, no safety checks), so that the
worker's outputs can be compared against it pixel for pixel. Run it with
BLENDER_USER_RESOURCES and XDG_CACHE_HOME pointing at scratch folders.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scene")
    ap.add_argument("out_dir")
    ap.add_argument("--frames", required=True, help="comma-separated frame numbers")
    ap.add_argument("--format", choices=["PNG", "EXR"], default="PNG")
    ap.add_argument("--color-depth", choices=["8", "16", "32"])
    ap.add_argument("--samples", type=int)
    ap.add_argument("--resolution-percent", type=int)
    ap.add_argument("--resolution", type=int, nargs=2, metavar=("W", "H"))
    args = ap.parse_args(argv)

    # Keep bpy's chatter off stdout, which carries our one JSON line.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import bpy

    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.scene), load_ui=False, use_scripts=False)
    sc = bpy.context.scene
    r, im = sc.render, sc.render.image_settings
    im.media_type = "IMAGE"
    im.file_format = "PNG" if args.format == "PNG" else "OPEN_EXR"
    im.color_mode = "RGBA"
    im.color_depth = args.color_depth or ("8" if args.format == "PNG" else "16")
    if args.format == "EXR":
        im.exr_codec = "ZIP"
    if args.samples is not None:
        sc.cycles.samples = args.samples
        sc.eevee.taa_render_samples = args.samples
    if args.resolution_percent is not None:
        r.resolution_percentage = args.resolution_percent
    if args.resolution is not None:
        r.resolution_x, r.resolution_y = args.resolution
    ext = ".png" if args.format == "PNG" else ".exr"
    outputs = []
    for f in (int(x) for x in args.frames.split(",")):
        sc.frame_set(f)
        path = os.path.join(os.path.abspath(args.out_dir), f"frame_{f:04d}{ext}")
        r.filepath = path
        t0 = time.perf_counter()
        bpy.ops.render.render(animation=False, write_still=True)
        outputs.append({"frame": f, "path": path, "seconds": round(time.perf_counter() - t0, 4)})
    out.write(json.dumps({"outputs": outputs}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
