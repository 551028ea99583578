"""A malicious worker for the verification tests: the real worker daemon, its render results tampered with.

    python -m tests.helpers.cheater --mode MODE [--seed N] <the options of `farm worker`>

It runs :func:`worker.daemon.main` (through ``farm worker``'s own parser) with ``EXECUTORS["render"]``
wrapped, so it connects, renders, uploads and reports exactly like an honest worker; only the files differ.
Every file keeps its name, format (PNG 8/16-bit or EXR, same channels) and size. Modes:

* ``black``: an all-black image (alpha opaque);
* ``noise``: uniform random colours (alpha opaque), seeded by ``--seed`` and the task id;
* ``copy``: the correct render of the first frame it ever rendered (per output size and layout), returned
  as is for every later frame;
* ``stale``: the honest render of frame ``f + STALE_OFFSET`` (same job, same settings) returned as frame
  ``f`` — a frame "from elsewhere" that is a real, plausible render (the sample turntable turns 15° a
  frame, so 12 frames is a half turn). The file is the render of that frame as Blender wrote it (its
  metadata names the other frame);
* ``fewer_samples``: the frame rendered with ``settings["samples"] = 1`` and nothing else changed;
* ``painted``: the correct render with a flat magenta rectangle over about 5 % of its area, at a position
  seeded by ``--seed`` and the task id.

``black``, ``noise``, ``copy`` and ``painted`` render the real frame first (the simplest way to learn the
size, format and metadata; a real cheater would skip it). ``verify`` tasks (spot checks of other workers'
results) stay honest in every mode but ``noise``: a cheater can tell a check from work by its kind, and
the scheme must not depend on checkers being unable to; ``noise`` garbles checks too, for tests of a
dishonest checker.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from common import rasters
from worker.tasks.executors import EXECUTORS, Produced, TaskContext

MODES = ("black", "noise", "copy", "stale", "fewer_samples", "painted")
STALE_OFFSET = 12
PAINT_FRACTION = 0.05
PAINT_RGB = (1.0, 0.0, 1.0)  # magenta, as a fraction of full scale

log = logging.getLogger("cheater")


# ------------------------------------------------------------------ pixel tampering
def _full(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _channels(r: rasters.Raster):
    """(plane key, channel index or None, channel letter R/G/B/A/Y) of every channel of ``r``."""
    if r.kind == "png":
        n = r.planes[""].shape[2]
        return [("", i, {1: "Y", 2: "YA", 3: "RGB", 4: "RGBA"}[n][i]) for i in range(n)]
    return [(k, None, k.split(".")[-1]) for k in r.planes]


def _fill(r: rasters.Raster, values, box=None) -> None:
    """Set each channel in ``box`` (x0, x1, y0, y1; all by default) to ``values(shape, letter)``: an
    array of the box's shape in 0..1 of full scale."""
    x0, x1, y0, y1 = box or (0, r.width, 0, r.height)
    for key, ch, letter in _channels(r):
        plane = r.planes[key]
        v = np.asarray(values((y1 - y0, x1 - x0), letter), np.float64) * _full(plane.dtype)
        v = np.rint(v) if np.issubdtype(plane.dtype, np.integer) else v
        if ch is None:
            plane[y0:y1, x0:x1] = v.astype(plane.dtype)
        else:
            plane[y0:y1, x0:x1, ch] = v.astype(plane.dtype)


def tamper_file(path: Path, mode: str, seed: int) -> None:
    """Rewrite ``path`` in place for the pixel modes (black, noise, painted)."""
    r = rasters.read(path)
    r.planes = {k: v.copy() for k, v in r.planes.items()}   # decoded arrays may be read-only
    rng = np.random.default_rng(seed)
    if mode == "black":
        _fill(r, lambda shape, c: np.full(shape, 1.0 if c == "A" else 0.0))
    elif mode == "noise":
        _fill(r, lambda shape, c: np.ones(shape) if c == "A" else rng.random(shape))
    elif mode == "painted":
        side = np.sqrt(PAINT_FRACTION)
        w, h = max(1, round(r.width * side)), max(1, round(r.height * side))
        x0, y0 = int(rng.integers(0, r.width - w + 1)), int(rng.integers(0, r.height - h + 1))
        colour = dict(zip("RGB", PAINT_RGB), A=1.0, Y=0.5)
        _fill(r, lambda shape, c: np.full(shape, colour.get(c, 0.5)), (x0, x0 + w, y0, y0 + h))
    else:
        raise ValueError(mode)
    rasters.write(path, r)


# ------------------------------------------------------------------ executors
class Cheater:
    def __init__(self, mode: str, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.seed = mode, seed
        self.honest_render, self.honest_verify = EXECUTORS["render"][1], EXECUTORS["verify"][1]
        self.first: dict[tuple, tuple[int, Path]] = {}   # copy: output layout and size → (frame, kept file)

    def install(self) -> None:
        EXECUTORS["render"] = (EXECUTORS["render"][0], self.render)
        if self.mode == "noise":
            EXECUTORS["verify"] = (EXECUTORS["verify"][0], self.verify)

    async def _elsewhere(self, ctx: TaskContext, spec: dict, rename) -> list[Produced]:
        """Render ``spec`` instead of the task's spec, in a side folder; outputs moved to the task's names."""
        side = ctx.out_dir / ".cheat"
        side.mkdir(parents=True, exist_ok=True)
        produced = await self.honest_render(dataclasses.replace(ctx, spec=spec, out_dir=side))
        out = []
        for p in produced:
            name, frame = rename(p)
            dst = ctx.out_dir / name
            p.path.replace(dst)
            out.append(Produced(name, dst, frame, p.seconds))
        return out

    async def render(self, ctx: TaskContext) -> list[Produced]:
        spec, mode = ctx.spec, self.mode
        if mode == "fewer_samples":
            settings = {**spec.get("settings", {}), "samples": 1}
            produced = await self.honest_render(dataclasses.replace(ctx, spec={**spec, "settings": settings}))
        elif mode == "stale":
            frames = [f + STALE_OFFSET for f in spec.get("frames", [])]

            def back(p: Produced) -> tuple[str, int]:
                f = p.frame - STALE_OFFSET
                return p.name.replace(f"{p.frame:04d}", f"{f:04d}", 1), f
            produced = await self._elsewhere(ctx, {**spec, "frames": frames}, back)
        else:
            produced = await self.honest_render(ctx)
            for p in produced:
                if mode == "copy":
                    r = rasters.read(p.path)
                    key = (r.layout(), r.width, r.height)
                    if key not in self.first:
                        keep = ctx.out_dir.parents[1] / "cheater_memory" / f"{len(self.first)}_{p.name}"
                        keep.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(p.path, keep)
                        self.first[key] = (p.frame, keep)
                    elif self.first[key][0] != p.frame:
                        shutil.copyfile(self.first[key][1], p.path)
                else:
                    tamper_file(p.path, mode, self.seed * 1_000_003 + ctx.task_id)
        log.warning("cheater (%s): task %s/%s returns %s", mode, ctx.task_id, ctx.attempt,
                    [p.name for p in produced])
        return produced

    async def verify(self, ctx: TaskContext) -> list[Produced]:
        produced = await self.honest_verify(ctx)
        for p in produced:
            tamper_file(p.path, self.mode, self.seed * 1_000_003 + ctx.task_id)
        log.warning("cheater (%s): check task %s/%s garbled", self.mode, ctx.task_id, ctx.attempt)
        return produced


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.cheater",
                                 description="a farm worker that tampers with its renders (tests only)")
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--seed", type=int, default=0)
    args, rest = ap.parse_known_args(argv)
    Cheater(args.mode, args.seed).install()
    print(f"cheater: mode {args.mode}", flush=True)
    from client import cli
    return cli.main(["worker", *rest])


if __name__ == "__main__":
    sys.exit(main())
