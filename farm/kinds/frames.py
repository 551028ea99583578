"""Turning a job request into a plan of tasks.

Frame specs use the Blender/Deadline style ``1-24,30,40-50x2`` (ranges, single frames, ``xN`` steps).
Frames are split into chunks of ``chunk`` consecutive frames, one task per chunk. A plan names every
output a task must return (the coordinator accepts a result only if it has exactly those names) and the
tasks it waits for. Validation errors are :class:`SpecError` with a message that says how to fix them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from common.limits import MAX_RESOLUTION, MAX_SAMPLES, RENDER_PASSES, pass_output
from farm.constants import MAX_FRAMES_PER_JOB

_PART = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*(?:x\s*(\d+)\s*)?)?$")

FORMATS = {"PNG": ("8", "16"), "EXR": ("16", "32")}


class SpecError(ValueError):
    """A job request that cannot be split; the message tells the creator what to change."""


def parse_frames(spec: str) -> list[int]:
    """Sorted unique frame numbers of ``spec`` (e.g. ``1-24,30,40-50x2``)."""
    if not spec or not spec.strip():
        raise SpecError("frames is empty: give frames like '1-24' or '1-24,30,40-50x2'")
    frames: set[int] = set()
    for part in spec.split(","):
        m = _PART.match(part)
        if not m:
            raise SpecError(f"frames part {part.strip()!r} is not N, A-B or A-BxSTEP (example: 1-24,30,40-50x2)")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) else 1
        if end < start:
            raise SpecError(f"frames range {part.strip()!r} ends before it starts: write {end}-{start}")
        if step < 1:
            raise SpecError(f"frames step in {part.strip()!r} must be 1 or more")
        if (end - start) // step + 1 + len(frames) > MAX_FRAMES_PER_JOB:
            raise SpecError(f"more than {MAX_FRAMES_PER_JOB} frames in one job: split it into several jobs")
        frames.update(range(start, end + 1, step))
    return sorted(frames)


def chunks(frames: list[int], chunk: int) -> list[list[int]]:
    if chunk < 1:
        raise SpecError("chunk must be 1 or more frames per task")
    return [frames[i:i + chunk] for i in range(0, len(frames), chunk)]


MAX_TIME_LIMIT = 7 * 86400
"""Longest a job may let one frame take (seconds)."""


def render_settings(fmt: str = "PNG", color_depth: str | None = None, samples: int | None = None,
                    resolution_percent: int | None = None,
                    resolution: list[int] | tuple[int, int] | None = None,
                    time_limit: int | None = None, passes: list[str] | str | None = None) -> dict[str, Any]:
    """Validated render overrides for a Blender job (None: keep the scene's own value). A ``resolution``
    [width, height] is the output size in pixels: the percentage then defaults to 100, not the scene's.
    ``time_limit``: seconds one frame may take on a worker (its sandbox stops it then; None: the worker's
    default, worker.settings.TASK_SECONDS). ``passes``: render passes written next to each frame
    (:data:`common.limits.RENDER_PASSES`)."""
    fmt = fmt.upper()
    if fmt not in FORMATS:
        raise SpecError(f"format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    depth = str(color_depth) if color_depth else FORMATS[fmt][0]
    if depth not in FORMATS[fmt]:
        raise SpecError(f"color depth {depth} is not available for {fmt}: use one of {', '.join(FORMATS[fmt])}")
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise SpecError(f"samples must be between 1 and {MAX_SAMPLES}")
    if resolution_percent is not None and not 1 <= resolution_percent <= 1000:
        raise SpecError("resolution percent must be between 1 and 1000")
    if time_limit is not None and (type(time_limit) is not int or not 1 <= time_limit <= MAX_TIME_LIMIT):
        raise SpecError(f"time limit must be 1 to {MAX_TIME_LIMIT} seconds a frame")
    settings = {"format": fmt, "color_depth": depth, "samples": samples,
                "resolution_percent": resolution_percent, "max_resolution": MAX_RESOLUTION}
    if time_limit is not None:
        settings["time_limit"] = time_limit
    if passes:
        if isinstance(passes, str):
            passes = [p.strip() for p in passes.split(",") if p.strip()]
        if not isinstance(passes, list) or not passes or not set(passes) <= set(RENDER_PASSES) \
                or len(set(passes)) != len(passes):
            raise SpecError(f"passes must name each of {', '.join(RENDER_PASSES)} at most once (got {passes!r})")
        settings["passes"] = list(passes)
    if resolution is not None:
        if (not isinstance(resolution, (list, tuple)) or len(resolution) != 2
                or any(type(v) is not int or not 4 <= v <= MAX_RESOLUTION for v in resolution)):
            raise SpecError(f"resolution must be [width, height] in pixels, each 4 to {MAX_RESOLUTION}")
        settings["resolution"] = list(resolution)
        settings["resolution_percent"] = resolution_percent or 100
    return settings


PER_TASK_SETTINGS = ("tile", "stamp_fps")
"""Keys a task's render settings may add to its job's (tiles.plan_job: the tile it renders, and for a video
job the frame rate stamped in its frames): a job's history is matched on the settings without them."""


def same_settings(task_settings: dict[str, Any] | None, job_settings: dict[str, Any] | None) -> bool:
    """Whether a task rendered with ``task_settings`` is history for a job with ``job_settings`` (None: any
    settings): equal but for the per-task keys, so a tiled or video job's tasks count for the same scene."""
    if job_settings is None:
        return True
    if not isinstance(task_settings, dict):
        return False
    drop = PER_TASK_SETTINGS
    return ({k: v for k, v in task_settings.items() if k not in drop}
            == {k: v for k, v in job_settings.items() if k not in drop})


def tiles_per_frame(task_settings: dict[str, Any] | None) -> int:
    """How many tasks like this one render a frame: a tile task's grid size, else 1."""
    tile = task_settings.get("tile") if isinstance(task_settings, dict) else None
    try:
        return max(1, int(tile["cols"]) * int(tile["rows"])) if isinstance(tile, dict) else 1
    except (KeyError, TypeError, ValueError):
        return 1


def job_tiles(job_spec: dict[str, Any]) -> int:
    """Tiles a frame of a Blender job has (1 untiled): a tiled job's unit is a tile."""
    t = job_spec.get("tiles")
    try:
        cols, rows = (int(v) for v in str(t).lower().split("x")) if t else (1, 1)
    except ValueError:
        return 1
    return max(1, cols * rows)


@dataclass
class TaskPlan:
    """One task to create: its kind, spec, input blobs, the output names it must return, whether those
    outputs are results of the job (``final``) or intermediate, and the plans (by index) it waits for."""
    kind: str
    spec: dict[str, Any]
    inputs: list[str]
    outputs: list[str]
    final: bool = True
    needs: list[int] = field(default_factory=list)
    units: int = 1  # progress units: frames, tiles, images
    held: bool = False  # waits for something outside the job (another job's outputs): starts waiting


def frame_name(frame: int, fmt: str) -> str:
    return f"frame_{frame:04d}.{'exr' if fmt == 'EXR' else 'png'}"


def plan_blender(scene_sha256: str, frames_spec: str, chunk: int, settings: dict[str, Any]) -> list[TaskPlan]:
    """A frame job: one render task per chunk of frames, each returning its frames' files."""
    plans = []
    for c in chunks(parse_frames(frames_spec), chunk):
        names = [n for f in c for n in [frame_name(f, settings["format"]),
                                         *(pass_output(p, f) for p in settings.get("passes") or [])]]
        plans.append(TaskPlan("render", {"frames": c, "settings": settings, "scene_sha256": scene_sha256},
                              [scene_sha256], names, units=len(c)))
    return plans


def split_blender(frames_spec: str, chunk: int = 1) -> list[dict[str, Any]]:
    """Frames of each task of a frame job (without settings)."""
    return [{"frames": c} for c in chunks(parse_frames(frames_spec), chunk)]
