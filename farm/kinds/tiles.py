"""Tiled frames and video: the task plan of a
Blender job with tiles and/or a video (tile renders → one assemble task per frame → one encode task).

Geometry (edges, rectangles, tile names) is :mod:`common.tiles`, shared with the worker's runtime and
assembler so that they cannot disagree.

Invariants of a plan:

* a tile task renders one tile of one frame (kind ``render``, ``settings["tile"]`` set), its output is
  intermediate (``final=False``) and counts one progress unit: a tiled job's progress counts tiles;
* each frame's ``assemble`` task needs exactly that frame's tiles and returns the frame under the same
  name an untiled job would (``frame_0007.png``); it follows its tiles in task order, so a frame is
  stitched as soon as its tiles are in, not after every tile of the job;
* ``encode`` needs every task that returns a final frame, and returns ``video.mp4``;
* assemble and encode count no progress units (they are quick, and progress means tiles or frames).

The frame's size is not known at submit (it lives in the .blend) unless the job gives a resolution:
with one, more tiles than pixels is refused at submit; without, the worker refuses the tile task
(not retryable, so the job fails at once) with the same message, :func:`too_many_tiles`.
"""
from __future__ import annotations

import re
from typing import Any

from common import limits as C
from common.tiles import tile_name, too_many_tiles
from farm.kinds import frames as splitter
from farm.kinds.frames import SpecError, TaskPlan

_TILES = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

VIDEO_NAME = "video.mp4"
"""Output name of a job's video."""


def parse_tiles(spec: str | None) -> tuple[int, int] | None:
    """``"4x3"`` → (4 columns, 3 rows); None or empty → None. Raises SpecError with the fix."""
    if spec is None or not str(spec).strip():
        return None
    m = _TILES.match(str(spec))
    if not m:
        raise SpecError(f"tiles {spec!r} is not COLSxROWS: write e.g. 4x4 or 8x4")
    cols, rows = int(m.group(1)), int(m.group(2))
    top = C.MAX_TILES_PER_SIDE
    if not (1 <= cols <= top and 1 <= rows <= top):
        raise SpecError(f"tiles {cols}x{rows}: columns and rows must be 1 to {top} (1x1 … {top}x{top})")
    return cols, rows


def plan_job(scene_sha256: str, frames_spec: str, chunk: int, settings: dict[str, Any], tiles: str | None = None,
             video: bool = False, overscan: int | None = None) -> list[TaskPlan]:
    """The plan of a Blender frame job: plain frame chunks, or tiles + assembly per frame; plus an encode
    task when ``video``. ``settings`` come from :func:`farm.kinds.frames.render_settings`."""
    grid = parse_tiles(tiles)
    if grid == (1, 1):
        grid = None  # one tile is the whole frame: render it as an untiled frame, nothing to stitch
    if overscan is not None:
        if grid is None:
            raise SpecError("overscan applies to tiled jobs only: add tiles (e.g. 4x4) or drop overscan")
        if type(overscan) is not int or not 0 <= overscan <= C.MAX_TILE_OVERSCAN:
            raise SpecError(f"overscan must be 0 to {C.MAX_TILE_OVERSCAN} pixels")
    if settings.get("passes") and (grid is not None or video or settings.get("format") != "PNG"):
        raise SpecError("render passes are written for whole PNG frames of a frame job for now: leave out tiles "
                        "and video, render PNG")
    if video:
        settings = {**settings, "stamp_fps": True}  # frames carry the scene's frame rate to the encoder
    if grid is None:
        plans = splitter.plan_blender(scene_sha256, frames_spec, chunk, settings)
    else:
        if chunk != 1:
            raise SpecError("chunk and tiles do not combine: a tile task renders one tile of one frame "
                            "(leave chunk at 1)")
        res = settings.get("resolution")
        if res:  # the size is known at submit: refuse now rather than on the worker
            pct = settings.get("resolution_percent") or 100
            problem = too_many_tiles(*grid, res[0] * pct // 100, res[1] * pct // 100)
            if problem:
                raise SpecError(problem)
        plans = _tiled(scene_sha256, splitter.parse_frames(frames_spec), grid, settings, overscan)
    if video:
        finals = [i for i, p in enumerate(plans) if p.final]
        names = [n for p in plans if p.final for n in p.outputs]
        frames = [f for p in plans if p.final for f in p.spec["frames"]]
        plans.append(TaskPlan("encode", {"frames": frames, "frame_names": names, "crf": C.VIDEO_CRF},
                              [], [VIDEO_NAME], final=True, needs=finals, units=0))
    return plans


def _tiled(scene: str, frames: list[int], grid: tuple[int, int], settings: dict[str, Any],
           overscan: int | None) -> list[TaskPlan]:
    cols, rows = grid
    fmt = settings["format"]
    plans: list[TaskPlan] = []
    for f in frames:
        first = len(plans)
        names = []
        for row in range(rows):
            for col in range(cols):
                tile = {"cols": cols, "rows": rows, "col": col, "row": row, "overscan": overscan}
                name = tile_name(f, row, col, fmt)
                names.append(name)
                plans.append(TaskPlan("render", {"frames": [f], "settings": {**settings, "tile": tile},
                                                 "scene_sha256": scene},
                                      [scene], [name], final=False, units=1))
        plans.append(TaskPlan("assemble", {"frames": [f], "cols": cols, "rows": rows, "tiles": names,
                                           "format": fmt, "color_depth": settings["color_depth"]},
                              [], [splitter.frame_name(f, fmt)], final=True,
                              needs=list(range(first, len(plans))), units=0))
    return plans
