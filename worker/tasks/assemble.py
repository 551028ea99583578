"""Work done after rendering, without Blender: stitching a frame's tiles, encoding frames into a video.

Both run in the worker daemon's threads (no bpy, no torch; numpy, Pillow, OpenEXR and imageio-ffmpeg's
ffmpeg binary). The executors in :mod:`worker.tasks.executors` call :func:`assemble_frame` and
:func:`encode_video` with local paths and turn :class:`AssemblyError` into a task failure.

Invariants:

* a stitched frame is the tiles pasted at the :mod:`farm.kinds.tiles` grid of the frame size they add up to,
  every sample copied bit for bit (PNG 8/16 bits, EXR half/float, alpha included); tiles whose sizes do
  not form that grid, or that differ in format, channels or sample type, are refused, never resized;
* the frame keeps the metadata of its top-left tile (colour space, stamp fields, the fps note), less the
  timings of that one tile's render;
* a video has one video frame per job frame, in frame order, at the job frames' size (an odd width or
  height is padded by one repeated row/column: yuv420p needs even sizes), H.264 at the given CRF, at the
  frame rate the Blender runtime noted in the frames' metadata (``Note: renderhive fps=N/BASE``), or
  :data:`worker.settings.VIDEO_DEFAULT_FPS` when the frames carry none.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common import limits as L
from common import rasters
from common.tiles import edges
from worker import settings as C

FPS_NOTE = re.compile(r"renderhive fps=([0-9.]+)/([0-9.]+)")


class AssemblyError(ValueError):
    """The inputs cannot make the output; the message names the file and the problem."""


def assemble_frame(tiles: list[list[Path]], out: Path) -> dict:
    """Stitch ``tiles`` (rows from the top, each a list of columns from the left) into ``out``.
    Returns {"width", "height"}."""
    rows, cols = len(tiles), len(tiles[0]) if tiles else 0
    if not rows or any(len(r) != cols for r in tiles):
        raise AssemblyError("the tiles do not form a grid (every row needs the same number of columns)")
    try:
        grid = [[rasters.read(p) for p in row] for row in tiles]
    except rasters.RasterError as exc:
        raise AssemblyError(f"cannot read a tile: {exc}") from None
    first = grid[0][0]
    widths = [t.width for t in grid[0]]
    heights = [row[0].height for row in grid]
    width, height = sum(widths), sum(heights)
    xs, ys = edges(cols, width), edges(rows, height)
    if [xs[i + 1] - xs[i] for i in range(cols)] != widths or [ys[j + 1] - ys[j] for j in range(rows)] != heights:
        raise AssemblyError(f"tile sizes {widths} x {heights} are not the {cols}x{rows} grid of a {width}x{height} "
                            "frame: the tiles come from renders of different sizes")
    frame = first.blank(width, height)
    for j, row in enumerate(grid):
        for i, t in enumerate(row):
            name = tiles[j][i].name
            if t.layout() != first.layout():
                raise AssemblyError(f"tile {name} has another format or channel layout than {tiles[0][0].name}")
            if (t.width, t.height) != (widths[i], heights[j]):
                raise AssemblyError(f"tile {name} is {t.width}x{t.height}, its place in the grid is "
                                    f"{widths[i]}x{heights[j]}")
            frame.paste(t, xs[i], ys[j])
    rasters.write(out, frame, drop_attempt_meta=True)
    return {"width": width, "height": height}


def frame_fps(raster: rasters.Raster) -> float | None:
    """The frame rate the Blender runtime noted in a frame's metadata, if any."""
    m = FPS_NOTE.search(rasters.text_meta(raster).get("Note", ""))
    if not m:
        return None
    fps = float(m.group(1)) / float(m.group(2))
    return fps if 0 < fps <= 1000 else None


def to_rgb8(raster: rasters.Raster) -> np.ndarray:
    """An H×W×3 uint8 display image of a frame: PNG samples scaled to 8 bits and composited over black;
    EXR (linear, premultiplied) through the sRGB transfer curve — a plain approximation of the scene's
    view transform, which lives in the .blend."""
    if raster.kind == "png":
        px = raster.planes[""]
        scale = 255.0 / np.iinfo(px.dtype).max
        color = px[..., :3] if px.shape[2] >= 3 else np.repeat(px[..., :1], 3, axis=2)
        value = color.astype(np.float32) * scale
        if px.shape[2] in (2, 4):  # straight alpha: over black
            value *= px[..., -1:].astype(np.float32) / np.iinfo(px.dtype).max
        return np.clip(np.rint(value), 0, 255).astype(np.uint8)
    planes = raster.planes
    names = [c for c in ("R", "G", "B") if c in planes] or ["Y"] * 3
    if any(n not in planes for n in names):
        raise AssemblyError(f"EXR frame has channels {sorted(planes)}; it needs R, G, B (or Y)")
    lin = np.clip(np.stack([planes[n].astype(np.float32) for n in names], axis=-1), 0.0, 1.0)
    srgb = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * np.power(lin, 1 / 2.4) - 0.055)
    return np.rint(srgb * 255).astype(np.uint8)


def encode_video(frames: list[Path], out: Path, crf: int = L.VIDEO_CRF, fps: float | None = None,
                 stop: threading.Event | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode ``frames`` (in order) to an H.264 MP4 at ``out``. Returns {"frames", "width", "height", "fps"}.
    ``stop`` set: abandon (raises AssemblyError); ``progress(done, total)`` after each frame."""
    import imageio_ffmpeg
    if not frames:
        raise AssemblyError("no frames to encode")
    first = _read(frames[0])
    fps = fps or frame_fps(first) or C.VIDEO_DEFAULT_FPS
    width, height = first.width, first.height
    size = (width + width % 2, height + height % 2)
    writer = imageio_ffmpeg.write_frames(
        str(out), size, pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=fps, codec="libx264", quality=None,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", str(int(crf)), "-movflags", "+faststart"])
    writer.send(None)  # start ffmpeg
    try:
        for n, path in enumerate(frames):
            if stop is not None and stop.is_set():
                raise AssemblyError("encoding was canceled")
            r = first if n == 0 else _read(path)
            if (r.width, r.height) != (width, height):
                raise AssemblyError(f"{path.name} is {r.width}x{r.height}, the video is {width}x{height}: "
                                    "every frame of a video must have the same size")
            rgb = to_rgb8(r)
            if size != (width, height):
                rgb = np.pad(rgb, ((0, size[1] - height), (0, size[0] - width), (0, 0)), mode="edge")
            writer.send(np.ascontiguousarray(rgb))
            if progress:
                progress(n + 1, len(frames))
    finally:
        writer.close()
    return {"frames": len(frames), "width": size[0], "height": size[1], "fps": fps}


# ------------------------------------------------------------------ executors (see worker.tasks.executors)
async def assemble(ctx) -> list:
    """Executor of ``assemble`` tasks: the frame from its tiles (``spec["tiles"]``, row-major)."""
    from worker.tasks.executors import Produced, TaskFailure
    spec = ctx.spec
    cols, rows, names, frame = spec["cols"], spec["rows"], spec["tiles"], spec["frames"][0]
    if len(names) != cols * rows:
        raise TaskFailure(f"assemble task lists {len(names)} tiles for a {cols}x{rows} grid", False)
    grid = [[ctx.input_named(names[r * cols + c]) for c in range(cols)] for r in range(rows)]
    out = ctx.out_dir / spec["outputs"][0]
    t0 = time.perf_counter()
    try:
        await asyncio.to_thread(assemble_frame, grid, out)
    except AssemblyError as exc:  # the tiles are accepted already: another try would stitch the same files
        raise TaskFailure(f"cannot assemble frame {frame}: {exc}", False) from None
    return [Produced(out.name, out, frame, round(time.perf_counter() - t0, 4))]


async def encode(ctx) -> list:
    """Executor of ``encode`` tasks: ``video.mp4`` from the job's frames (``spec["frame_names"]``)."""
    from worker.tasks.executors import Produced, TaskFailure
    spec = ctx.spec
    paths = [ctx.input_named(n) for n in spec["frame_names"]]
    out = ctx.out_dir / spec["outputs"][0]
    loop, stop, last = asyncio.get_running_loop(), threading.Event(), [0.0]

    def progress(done: int, total: int) -> None:  # from the encoding thread: hand over to the loop
        if time.monotonic() - last[0] >= 1.0 or done == total:
            last[0] = time.monotonic()
            loop.call_soon_threadsafe(ctx.progress, 0, 0, f"encoded {done}/{total} frames")
    t0 = time.perf_counter()
    try:
        await asyncio.to_thread(encode_video, paths, out, int(spec.get("crf", L.VIDEO_CRF)), None, stop, progress)
    except asyncio.CancelledError:
        stop.set()  # the thread stops at its next frame
        raise
    except (AssemblyError, OSError) as exc:
        raise TaskFailure(f"cannot encode the video: {exc}", not isinstance(exc, AssemblyError)) from None
    return [Produced(out.name, out, 0, round(time.perf_counter() - t0, 4))]


def _read(path: Path) -> rasters.Raster:
    try:
        return rasters.read(path)
    except rasters.RasterError as exc:
        raise AssemblyError(f"cannot read frame {path.name}: {exc}") from None
