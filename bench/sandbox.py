"""What the worker's OS sandbox costs: the sample job's 24 frames rendered by the Blender runtime child with
and without the sandbox, side by side, plus the child's start-up time either way.

    python bench/sandbox.py [--quick] [--repeat R] [--percent P] [--samples S]

Each round starts one child of each kind (sandboxed: bubblewrap + seccomp + rlimits, worker/sandbox.py;
plain: the same command unconfined, as ``farm worker --no-sandbox`` runs it), renders frames 1-24 of
sample_scenes/turntable.blend in one request each, alternating which goes first. Goal: sandboxed / plain
render time ≤ 1.02. Every frame of both must be pixel-identical, which is checked after each round.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from worker import sandbox  # noqa: E402
from worker.runtimes.process import RuntimeProcess  # noqa: E402

SCENE = ROOT / "sample_scenes" / "turntable.blend"


async def one(workdir: Path, sandboxed: bool, frames: list[int], settings: dict) -> tuple[float, float, Path]:
    """(start-up seconds, render seconds, output folder) of one child rendering ``frames``."""
    policy = sandbox.Policy(workdir, uid=sandbox.SANDBOX_UID_BASE if os.geteuid() == 0 else None) \
        if sandboxed else None
    rt = RuntimeProcess("worker.runtimes.blender", ["--gpus", "none"], workdir, sandbox=policy)
    scene, out = workdir / "inputs" / "scene.blend", workdir / "out" / "frames"
    scene.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SCENE, scene)
    out.mkdir(parents=True)
    if policy is not None:
        sandbox.prepare(policy)
        sandbox.give(policy, out)
    t0 = time.perf_counter()
    await rt.start()
    t1 = time.perf_counter()
    async for ev in rt.request({"op": "render", "scene": str(scene), "scene_key": "bench", "frames": frames,
                                "out_dir": str(out), "settings": settings}):
        if ev.get("event") == "error":
            raise SystemExit(f"render failed: {ev.get('message')}")
    t2 = time.perf_counter()
    await rt.stop()
    return t1 - t0, t2 - t1, out


def same_pixels(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.png"))
    return names == sorted(p.name for p in b.glob("*.png")) and all(
        np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))) for n in names)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="frames 1-6, one round")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 1)")
    ap.add_argument("--percent", type=int, default=50, help="resolution percent (50: 160x120)")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    rounds = args.repeat or (1 if args.quick else 3)
    frames = list(range(1, 7 if args.quick else 25))
    settings = {"resolution_percent": args.percent, "samples": args.samples}
    print(f"bubblewrap sandbox: {sandbox.probe()}")
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="rh-bench-sandbox-") as tmp:
        os.chmod(tmp, 0o755)
        for r in range(rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            outs = {}
            for sandboxed in order:
                wd = Path(tmp) / f"r{r}-{'sandboxed' if sandboxed else 'plain'}"
                start, render, outs[sandboxed] = await one(wd, sandboxed, frames, settings)
                times[sandboxed].append((start, render))
                print(f"round {r + 1}: {'sandboxed' if sandboxed else 'plain    '} start-up {start:.2f} s, "
                      f"{len(frames)} frames {render:.2f} s", flush=True)
            if not same_pixels(outs[True], outs[False]):
                raise SystemExit("the sandboxed child's frames differ from the plain child's")
    med = {k: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v)) for k, v in times.items()}
    print(f"\nmedians over {rounds} round(s), {len(frames)} frames at {args.percent}% / {args.samples} samples:")
    print(f"  plain      start-up {med[False][0]:.2f} s   render {med[False][1]:.2f} s")
    print(f"  sandboxed  start-up {med[True][0]:.2f} s   render {med[True][1]:.2f} s")
    print(f"sandboxed/plain render = {med[True][1] / med[False][1]:.3f} (goal <= 1.02); start-up cost of the "
          f"sandbox {med[True][0] - med[False][0]:+.2f} s per child (paid once: children are long-lived)")
    print(f"pixels: all {len(frames)} frames identical in every round")


if __name__ == "__main__":
    asyncio.run(main())
