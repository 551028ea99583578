"""Verification: what spot checks cost, and what they catch, measured on real renders in one run.

    python bench/verify.py [--quick] [--frames 1-12] [--percent 50] [--samples 16] [--trials 400]

One Blender runtime child (the worker's own, ``worker.runtimes.blender``) renders the sample scene's
frames, then the check renders the coordinator would ask for at the default rates (farm/constants.py):
CHECK_CROPS regions of CHECK_CROP_FRACTION of the frame each (a trusted worker's sampled check), and the
whole frame (every result of a new worker). Printed:

* **overhead**: extra render seconds as a % of the job's render seconds, per tier: the expected value
  (rate × measured check cost ÷ measured frame cost) and the value of one sampled run (the coordinator's
  own coin flips, seeded) side by side; goal ≤ 5 % for trusted workers;
* **detection**: for each cheating mode of tests/helpers/cheater.py, made from these real renders, the
  share of wrong results a check catches: a whole-frame check (new workers) and a crops check (trusted:
  Monte Carlo over random crop positions, compared exactly as the coordinator does, the real region
  renders standing in for the first positions); and the share of jobs in which a cheater that starts as
  a new worker is caught (its first wrong result is checked whole).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import rasters  # noqa: E402
from farm import constants as C  # noqa: E402
from farm.verify import compare  # noqa: E402
from worker.runtimes.process import RuntimeProcess  # noqa: E402

SCENE = ROOT / "sample_scenes" / "turntable.blend"
MODES = ["black", "noise", "copy", "stale", "fewer_samples", "painted"]


async def render(rt: RuntimeProcess, out: Path, frames: list[int], settings: dict) -> list[dict]:
    outs: list[dict] = []
    async for ev in rt.request({"op": "render", "scene": str(SCENE), "scene_key": "bench", "frames": frames,
                                "out_dir": str(out), "settings": settings}):
        if ev.get("event") == "error":
            raise RuntimeError(ev.get("message"))
        if ev.get("event") == "done":
            outs = ev["outputs"]
    return outs


def crops(rng: random.Random, w: int, h: int) -> list[tuple[int, int, int, int]]:
    """The regions the coordinator picks (farm.verify.verifier.Verifier._crops)."""
    side = math.sqrt(C.CHECK_CROP_FRACTION)
    cw, ch = max(1, min(w, round(w * side))), max(1, min(h, round(h * side)))
    out = []
    for _ in range(C.CHECK_CROPS):
        x0, y0 = rng.randrange(0, w - cw + 1), rng.randrange(0, h - ch + 1)
        out.append((x0, x0 + cw, y0, y0 + ch))
    return out


def painted(r: rasters.Raster, seed: int) -> rasters.Raster:
    a = r.planes[""].copy()
    h, w = a.shape[:2]
    rng = np.random.default_rng(seed)
    bw, bh = max(1, round(w * math.sqrt(0.05))), max(1, round(h * math.sqrt(0.05)))
    x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    a[y:y + bh, x:x + bw, :3] = (255, 0, 255)[: a.shape[2]] if a.shape[2] >= 3 else 255
    return rasters.Raster(r.kind, {"": a}, r.meta)


def fill(r: rasters.Raster, value) -> rasters.Raster:
    a = np.zeros_like(r.planes[""])
    a[...] = value
    return rasters.Raster(r.kind, {"": a}, r.meta)


async def run(args) -> None:
    frames = list(range(1, args.frames + 1))
    settings = {"resolution_percent": args.percent, "samples": args.samples, "format": "PNG", "color_depth": "8"}
    with tempfile.TemporaryDirectory(prefix="rh-verify-") as d:
        tmp = Path(d)
        rt = RuntimeProcess("worker.runtimes.blender", ["--gpus", "none"], tmp / "rt")
        await rt.start()
        try:
            await render(rt, tmp / "warm", [frames[0]], settings)  # scene load, kernels
            t0 = time.perf_counter()
            honest = {o["frame"]: o for o in await render(rt, tmp / "frames", frames, settings)}
            job_wall = time.perf_counter() - t0
            frame_s = {f: o["seconds"] for f, o in honest.items()}
            img = {f: rasters.read(o["path"]) for f, o in honest.items()}
            w, h = img[frames[0]].width, img[frames[0]].height
            # a trusted worker's check: CHECK_CROPS regions of each frame, rendered for real
            rng = random.Random(1)
            crop_s, real_regions = {}, {}
            for f in frames:
                boxes = crops(rng, w, h)
                secs = 0.0
                for i, box in enumerate(boxes):
                    [o] = await render(rt, tmp / f"crops{f}_{i}", [f], {**settings, "region": list(box)})
                    secs += o["seconds"]
                    real_regions[(f, box)] = rasters.read(o["path"])
                crop_s[f] = secs
            few = {o["frame"]: rasters.read(o["path"])
                   for o in await render(rt, tmp / "few", frames, {**settings, "samples": 1})}
            stale = {o["frame"] - 12: rasters.read(o["path"])
                     for o in await render(rt, tmp / "stale", [f + 12 for f in frames], settings)}
        finally:
            await rt.stop()

    exact = [compare.compare(img[f], box, reg, True)["passed"] for (f, box), reg in real_regions.items()]
    total = sum(frame_s.values())
    print(f"\n{len(frames)} frames of {SCENE.name} at {w}x{h}, {args.samples} samples: {total:.2f} s of render "
          f"({job_wall:.2f} s wall), {total / len(frames) * 1000:.0f} ms a frame")
    print(f"region renders equal to the crop of the full frame: {sum(exact)}/{len(exact)}")

    # ---------------------------------------------------------------- overhead
    mean_frame, mean_crop = statistics.mean(frame_s.values()), statistics.mean(crop_s.values())
    print(f"\ncheck costs: whole frame {mean_frame * 1000:.0f} ms, {C.CHECK_CROPS} crops of "
          f"{C.CHECK_CROP_FRACTION:.0%} {mean_crop * 1000:.0f} ms "
          f"({mean_crop / mean_frame:.1%} of a frame: each region render has a fixed set-up cost)")
    print(f"\n{'tier':<10}{'rate':>6}  {'check':<7}{'expected':>10}{'sampled':>10}")
    coin = random.Random(7)
    for tier in ("new", "trusted", "top"):
        rate = C.CHECK_RATE[tier]
        full = C.CHECK_FULL_WHILE_NEW and tier == "new"
        cost = frame_s if full else crop_s
        expected = rate * statistics.mean(cost[f] / frame_s[f] for f in frames)
        sampled = sum(cost[f] for _ in range(max(1, args.repeat)) for f in frames
                      if coin.random() < rate) / (total * max(1, args.repeat))
        goal = "  (goal <= 5%)" if tier == "trusted" else ""
        print(f"{tier:<10}{rate:>6.0%}  {'frame' if full else 'crops':<7}{expected:>10.2%}{sampled:>10.2%}{goal}")

    # ---------------------------------------------------------------- detection
    def cheat(mode: str, f: int) -> rasters.Raster:
        return {"black": lambda: fill(img[f], (0, 0, 0, 255)),
                "noise": lambda: rasters.Raster("png", {"": np.random.default_rng(f).integers(
                    0, 256, img[f].planes[""].shape, dtype=np.uint8)}, img[f].meta),
                "copy": lambda: img[frames[0]], "stale": lambda: stale[f], "fewer_samples": lambda: few[f],
                "painted": lambda: painted(img[f], f)}[mode]()

    print(f"\n{'mode':<15}{'whole frame':>12}{'crops (trusted)':>17}{'jobs, new cheater':>19}"
          f"{'SSIM whole (min-max)':>23}{'cross-device rule':>19}")
    mc = random.Random(3)
    for mode in MODES:
        wrong = [f for f in frames if not np.array_equal(cheat(mode, f).planes[""], img[f].planes[""])]
        if not wrong:
            print(f"{mode:<15}{'(no wrong result)':>12}")
            continue
        full_hits = sum(not compare.compare(img[f], None, cheat(mode, f), True)["passed"] for f in wrong)
        cross = [compare.compare(img[f], None, cheat(mode, f), False) for f in wrong]
        ssims = [c["ssim"] for c in cross]
        cross_hits = sum(not c["passed"] for c in cross)
        crop_hits = trials = 0
        for f in wrong:
            bad = cheat(mode, f)
            for t in range(args.trials):
                boxes = crops(mc, w, h)
                caught = False
                for box in boxes:  # the honest region render equals the crop of the honest frame (above)
                    ref = real_regions.get((f, box)) or img[f].crop(*box)
                    caught = caught or not compare.compare(bad, box, ref, True)["passed"]
                crop_hits += caught
                trials += 1
        # a new cheater's first wrong result in a job is checked whole, so the job is caught iff that check is
        jobs = full_hits / len(wrong)
        print(f"{mode:<15}{full_hits / len(wrong):>12.1%}{crop_hits / trials:>17.1%}{jobs:>19.1%}"
              f"{f'{min(ssims):.3f}-{max(ssims):.3f}':>23}{cross_hits / len(wrong):>19.1%}")
    print(f"\nacross device types a region passes with mean SSIM >= {C.CHECK_SSIM_MIN} and no 7x7 window below "
          f"{C.CHECK_SSIM_WINDOW_MIN} (like devices: equal pixels); 'cross-device rule' is the share of wrong "
          "frames that rule catches")
    print("whole-frame checks catch every mode; crops miss a small painted region most of the time, which is "
          "why new workers are checked whole until they are trusted")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--percent", type=int, default=50)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--trials", type=int, default=400, help="crop draws per wrong frame (Monte Carlo)")
    ap.add_argument("--repeat", type=int, default=50, help="sampled runs averaged for 'this run'")
    ap.add_argument("--quick", action="store_true", help="4 frames at 25 %%, 100 trials")
    args = ap.parse_args()
    if args.quick:
        args.frames, args.percent, args.trials, args.repeat = 4, 25, 100, 10
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
