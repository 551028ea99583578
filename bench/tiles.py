"""Tile rendering: what splitting one frame costs, and what spreading its tiles over workers gains.

    python bench/tiles.py [--quick] [--repeat R] [--samples N] [--depth 8|16] [--farm-samples N]
                          [--skip-farm] [--keep]

Frame 5 of sample_scenes/turntable.blend at 320x240, 16 Cycles samples, 8-bit PNG (``--quick``: 160x120):

A. **cost of tiles** — one Blender runtime child (worker/runtimes/blender.py, driven like the worker does):
   the full frame, then every tile of it at 2x2, 4x4 and 8x8. Reported: the sum of the tiles' render
   seconds (as the runtime reports them: render + write + crop) ÷ the full frame's, the overhead per
   tile, and the same as CPU seconds of the Blender child (steadier than wall time on a shared machine).
   Three ways to render the tiles, interleaved:
   - *kept* (what the worker does): same scene key, so the .blend stays open and Cycles keeps its BVH and
     shaders between tiles (``use_persistent_data``); only the border changes; automatic overscan;
   - *kept, no overscan*: the same without the margin (what the margin costs);
   - *reload per tile* (what a naive worker would do): a new scene key per tile, so every tile opens the
     file again and rebuilds the BVH. Timed as wall time per request, since the load is outside render.
   The tiles are stitched with worker.tasks.assemble and compared with the full frame (must be bit-identical).
B. **speed-up** — ``farm serve`` and ``farm worker`` processes, every Blender child limited to one render
   thread (RENDERHIVE_RENDER_THREADS=1), one 4x4-tiled frame (64 samples by default) submitted and timed
   from submit to ``rendered`` (the coordinator's timestamp) on a farm of 1 worker and on a farm of 2,
   both running side by side with runs alternating. Also the same frame untiled on 1 worker, the baseline
   a tiled job competes with. Medians of R runs; every worker has the scene cached and loaded before
   timing (warm-up jobs).
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import localfarm  # noqa: E402
from common import rasters  # noqa: E402
from common.tiles import tile_name  # noqa: E402
from worker.runtimes.process import RuntimeProcess  # noqa: E402
from worker.tasks.assemble import assemble_frame  # noqa: E402

SCENE = ROOT / "sample_scenes" / "turntable.blend"
FRAME = 5
GRIDS = (2, 4, 8)
med = statistics.median


# ------------------------------------------------------------------ A: cost of tiles
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _request(rt: RuntimeProcess, key: str, out: Path, settings: dict) -> dict:
    payload = {"op": "render", "scene": str(SCENE), "scene_key": key, "frames": [FRAME], "out_dir": str(out),
               "settings": settings}
    events = [ev async for ev in rt.request(payload)]
    if events[-1]["event"] != "done":
        raise SystemExit(f"render failed: {events[-1]}")
    return events[-1]


async def _pass(rt: RuntimeProcess, out: Path, settings: dict, n: int | None, key: str | None,
                overscan: int | None = None) -> dict:
    """Render the full frame (n None) or all n×n tiles; ``key`` None: a new scene key per tile (reload).
    Returns the runtime's render seconds, this process's wall seconds and the child's CPU seconds."""
    cpu0, t0, render_s, loads = cpu_seconds(rt.pid), time.perf_counter(), 0.0, set()
    cells = [(r, c) for r in range(n) for c in range(n)] if n else [None]
    for i, cell in enumerate(cells):
        tile = None if cell is None else {"cols": n, "rows": n, "col": cell[1], "row": cell[0], "overscan": overscan}
        ev = await _request(rt, key or f"reload-{time.monotonic_ns()}-{i}", out, {**settings, "tile": tile})
        render_s += ev["outputs"][0]["seconds"]
        loads.add(ev["loads"])
    return {"render": render_s, "wall": time.perf_counter() - t0, "cpu": cpu_seconds(rt.pid) - cpu0,
            "loads": len(loads)}


MODES = (("kept", "scene", None), ("kept, no overscan", "scene", 0), ("reload per tile", None, None))


async def cost_of_tiles(tmp: Path, settings: dict, repeat: int) -> dict:
    rt = RuntimeProcess("worker.runtimes.blender", ["--gpus", "none"], tmp / "rt")
    await rt.start()
    runs: dict = {"full": []}
    try:
        await _pass(rt, tmp / "full", settings, None, "scene")  # load + first BVH build, not timed
        for _ in range(repeat):  # modes interleaved, so that other load on the machine hits all alike
            runs["full"].append(await _pass(rt, tmp / "full", settings, None, "scene"))
            for n in GRIDS:
                for mode, key, overscan in MODES:
                    if key is not None:
                        await _pass(rt, tmp / "warm", settings, None, key)  # back to the kept scene, warm
                    runs.setdefault((n, mode), []).append(
                        await _pass(rt, tmp / f"tiles{n}-{overscan}-{key}", settings, n, key, overscan))
        reference = rasters.read(tmp / "full" / f"frame_{FRAME:04d}.png")
        exact = {}
        for n in GRIDS:
            grid = [[tmp / f"tiles{n}-None-scene" / tile_name(FRAME, r, c, "PNG") for c in range(n)] for r in range(n)]
            assemble_frame(grid, tmp / f"assembled{n}.png")
            got = rasters.read(tmp / f"assembled{n}.png").planes[""]
            exact[n] = got.dtype == reference.planes[""].dtype and np.array_equal(got, reference.planes[""])
        return {"runs": runs, "exact": exact}
    finally:
        await rt.stop()


def report_cost(res: dict, size: str, samples: int, repeat: int, depth: str) -> None:
    runs = res["runs"]
    full = {k: med(r[k] for r in runs["full"]) for k in ("render", "wall", "cpu")}
    print(f"\nA. cost of tiles: frame {FRAME}, {size}, {samples} samples (adaptive sampling on: auto overscan "
          f"4 px), PNG {depth}-bit, one Blender child, median of {repeat}, modes interleaved")
    print(f"   full frame: {full['render']:.3f} s in the render call, {full['cpu']:.2f} CPU s")
    print(f"   {'grid':<5}{'mode':<19}{'sum tiles s':>12}{'÷ full':>8}{'per tile':>10}{'CPU s':>8}{'÷ full':>8}"
          f"{'loads':>7}")
    for n in GRIDS:
        for mode, key, _ in MODES:
            r = runs[(n, mode)]
            sec = med(x["render"] if key else x["wall"] for x in r)  # reload: the load happens outside render
            base = full["render"] if key else full["wall"]
            cpu = med(x["cpu"] for x in r)
            loads = max(x["loads"] for x in r)
            print(f"   {f'{n}x{n}':<5}{mode:<19}{sec:>12.3f}{sec / base:>8.2f}{(sec - base) / n / n * 1000:>8.0f}ms"
                  f"{cpu:>8.2f}{cpu / full['cpu']:>8.2f}{loads if key else n * n:>7}")
        same = "bit-identical" if res["exact"][n] else "DIFFERENT"
        print(f"   {'':<5}assembled {n}x{n} frame: {same} to the full render")
    print("   kept: the scene stays open between tiles (same scene key, persistent data keeps the BVH), 1 load "
          "for all tiles; reload per tile: a new key per tile, timed as wall per request (open + BVH + render)")


# ------------------------------------------------------------------ B: speed-up over workers
def speed_up(tmp: Path, samples: int, repeat: int, quick: bool) -> dict:
    """Two farms side by side, one with 1 worker and one with 2 (idle processes cost next to nothing),
    so that runs alternate between them and a change of load on the machine hits both alike."""
    env = localfarm.process_env({"RENDERHIVE_RENDER_THREADS": "1", "RENDERHIVE_LOG": "WARNING"})
    procs: list[localfarm.Proc] = []
    percent = 50 if quick else 100

    def start_farm(name: str, workers: int):
        coord = localfarm.Coordinator(tmp / name, env).start()
        procs.append(coord)
        client = coord.admin
        for i in range(workers):
            procs.append(localfarm.WorkerProc(tmp / f"{name}-w{i + 1}", coord, f"{name}-w{i + 1}", env, 1,
                                              gpus="none").start())
        localfarm.wait_workers(client, workers, 120)
        return client, client.upload_if_missing(SCENE)[0]

    def run(farm, tiles: str | None, key: str) -> float:
        client, sha = farm
        t = time.time()
        job = client.submit(scene_sha256=sha, frames=str(FRAME), samples=samples, resolution_percent=percent,
                            tiles=tiles, name="bench-tiles", client_key=key)
        view = localfarm.wait_for(lambda: (v := client.job(job["id"]))["status"] in
                                  ("rendered", "failed", "canceled") and v, 1200, 0.2, f"job {job['id']}")
        if view["status"] != "rendered":
            raise SystemExit(f"job {job['id']} {view['status']}: {view['error']}; logs in {tmp}")
        return view["updated_at"] - t
    try:
        one, two = start_farm("one", 1), start_farm("two", 2)
        for farm in (one, two, two):  # warm-ups: every worker fetches and loads the scene
            run(farm, "4x4", f"warm-{time.monotonic_ns()}")
        times: dict[str, list[float]] = {"plain": [], "one": [], "two": []}
        for i in range(repeat):
            times["plain"].append(run(one, None, f"plain-{i}"))
            times["one"].append(run(one, "4x4", f"one-{i}"))
            times["two"].append(run(two, "4x4", f"two-{i}"))
        done = {w["id"]: w["tasks_done"] for w in two[0].workers()}
        return {**{k: med(v) for k, v in times.items()}, "tasks_done": done,
                "size": f"{320 * percent // 100}x{240 * percent // 100}"}
    finally:
        for p in reversed(procs):
            p.stop()


def report_speed_up(res: dict, samples: int, repeat: int) -> None:
    print(f"\nB. one 4x4-tiled frame through the farm ({res['size']}, {samples} samples, one render thread per "
          f"worker, submit → rendered, median of {repeat}; {os.cpu_count()} cores)")
    print(f"   untiled, 1 worker:  {res['plain']:6.2f} s")
    print(f"   4x4,     1 worker:  {res['one']:6.2f} s   (tiles ÷ untiled {res['one'] / res['plain']:.2f})")
    print(f"   4x4,     2 workers: {res['two']:6.2f} s   speed-up over 1 worker {res['one'] / res['two']:.2f}x, "
          f"over the untiled frame {res['plain'] / res['two']:.2f}x")
    print(f"   tasks done by the two workers (all runs, warm-ups included): {res['tasks_done']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="160x120, one run")
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement; medians (default 3, quick 1)")
    ap.add_argument("--samples", type=int, default=16, help="samples for A")
    ap.add_argument("--depth", default="8", choices=["8", "16"], help="PNG bits for A (8: dithered, rendered "
                    "into the full-size buffer and cropped; 16: rendered into a cropped buffer)")
    ap.add_argument("--skip-farm", action="store_true", help="only A")
    ap.add_argument("--farm-samples", type=int, default=64, help="samples for B")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    percent = 50 if args.quick else 100
    size = f"{320 * percent // 100}x{240 * percent // 100}"
    tmp = Path(tempfile.mkdtemp(prefix="rh-tiles-"))
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(tmp / "bu"))
    os.environ.setdefault("XDG_CACHE_HOME", str(tmp / "xc"))
    try:
        settings = {"format": "PNG", "color_depth": args.depth, "samples": args.samples, "resolution_percent": percent}
        a = asyncio.run(cost_of_tiles(tmp / "a", settings, repeat))
        report_cost(a, size, args.samples, repeat, args.depth)
        if not args.skip_farm:
            b = speed_up(tmp / "b", args.farm_samples, repeat, args.quick)
            report_speed_up(b, args.farm_samples, repeat)
        ok = all(a["exact"].values())
        print(f"load average of the machine at the end: {os.getloadavg()[0]:.1f} (other processes share the "
              f"{os.cpu_count()} cores)")
        print(f"\nassembled frames bit-identical to the full render: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
