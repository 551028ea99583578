"""Stable Diffusion on the farm against the pipeline called directly, with the tiny model.

    python bench/diffusion.py [--quick] [--images N] [--steps S] [--size PX] [--repeat R] [--threads T] [--keep]

The tiny pipeline (``farm models tiny``: random weights, same code path as a real model) makes N images
(default 32) of one prompt with seeds base+k, 64x64, 50 steps, on the CPU (``--gpus none``) with one torch
thread on both sides (``--threads``; for this tiny model one thread is faster than two, and it keeps other
load on a shared machine from stalling OpenMP barriers). 50 steps make an image cost about 0.2 s here,
still far below a real model's seconds on a GPU. The farm's own cost is fixed per task (lease, PROGRESS,
upload, RESULT, each committed before it is answered: about 10-15 ms on a quiet machine), so it weighs
more on cheaper images (``--steps 20``, 0.1 s an image: farm/direct about 1.1) and on a loaded machine —
which is what micro-batches are for.

a. **direct**: one Python process loads the pipeline with ``from_pretrained`` and calls ``pipe(...)`` once
   per image with its own ``torch.Generator().manual_seed(base + k)``, saving each PNG. Timed from before
   the load to the last PNG written (``import torch, diffusers`` excluded, and reported).
b. **farm, micro-batch 1**: ``farm serve`` and one ``farm worker --models`` as subprocesses; a job of N
   images, one per task. Timed from submit to the coordinator marking the job ``rendered`` (its
   ``updated_at``), which includes the model load in the worker's diffusion runtime (once per worker: a
   fresh worker is started for every run, its start-up excluded and reported) and the job's contact sheet.
c. **farm, micro-batch 4**: the same with 4 images per task (same seeds; pixels within 1/255 of b's).

The farm's images are downloaded and compared with (a)'s: b must be pixel-identical, c within 1/255.
Runs alternate a, b, c; the numbers are medians. The machine may be shared: spread between runs is load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import localfarm  # noqa: E402

PY = sys.executable
PROMPT = "a watercolor painting of a lighthouse at dusk"
SEED = 1000

# Run as `python -c DIRECT_SCRIPT MODEL OUT_DIR N STEPS SIZE THREADS`; prints one JSON line.
DIRECT_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
os.environ["HF_HUB_OFFLINE"] = "1"
proto = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)
import torch, diffusers
t_imported = time.perf_counter()
model, out, n, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if int(sys.argv[6]):
    torch.set_num_threads(int(sys.argv[6]))  # as the farm's runtime does with RENDERHIVE_DIFFUSION_THREADS
pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
t_loaded = time.perf_counter()
per_image = []
for k in range(n):
    t = time.perf_counter()
    img = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED + k), num_inference_steps=steps,
               guidance_scale=7.5, width=size, height=size).images[0]
    img.save(os.path.join(out, f"image_{k:04d}.png"))
    per_image.append(time.perf_counter() - t)
t_end = time.perf_counter()
proto.write(json.dumps({"import_s": t_imported - t0, "load_s": t_loaded - t_imported,
                        "work_s": t_end - t_imported, "per_image": per_image}) + "\n")
proto.flush()
""".replace("PROMPT", repr(PROMPT)).replace("SEED", str(SEED))


def direct(model: Path, out: Path, n: int, steps: int, size: int, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([PY, "-c", DIRECT_SCRIPT, str(model), str(out), str(n), str(steps), str(size),
                           str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"direct run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def farm_run(coord: localfarm.Coordinator, tmp: Path, models: Path, run: str, n: int, steps: int, size: int,
             per_task: int, threads: int) -> dict:
    """A fresh worker (start-up excluded), one job of ``n`` images; seconds from submit to rendered."""
    env = localfarm.process_env({"RENDERHIVE_LOG": "WARNING", "HF_HUB_OFFLINE": "1",
                                 "RENDERHIVE_DIFFUSION_THREADS": str(threads)})
    t0 = time.perf_counter()
    w = localfarm.WorkerProc(tmp / f"worker-{run}", coord, f"bench-{run}", env, gpus="none", models=[models]).start()
    try:
        client = coord.admin
        localfarm.wait_for(lambda: any(x["online"] and x["id"] == f"bench-{run}" for x in client.workers()), 180,
                           0.05, "the worker to come online")
        startup = time.perf_counter() - t0
        t_submit = time.time()
        job = client.submit_diffusion(model="tiny-sd", prompts=[PROMPT], count=n, seed=SEED,
                                      steps=steps, width=size, height=size, per_task=per_task, name=run)
        view = localfarm.wait_for(lambda: (v := client.job(job["id"]))["status"] in ("rendered", "failed") and v,
                                  1200, 0.25, f"job {job['id']}")
        if view["status"] != "rendered":
            raise SystemExit(f"job {job['id']} failed: {view['error']} (logs in {tmp})")
        outs = client.outputs(job["id"])
        client.approve(job["id"])  # full-resolution images are released on approval
        client.download_results(job["id"], tmp / run)
        gen_s = sum(o["render_seconds"] for o in outs if o["name"].startswith("image_"))
        return {"s": view["updated_at"] - t_submit, "startup_s": startup, "gen_s": gen_s}
    finally:
        w.stop()


def max_diff(a_dir: Path, b_dir: Path, n: int) -> tuple[int, int]:
    """(images pixel-identical, largest channel difference /255) of b against a."""
    same, worst = 0, 0
    for k in range(n):
        a = np.asarray(Image.open(a_dir / f"image_{k:04d}.png")).astype(int)
        b = np.asarray(Image.open(b_dir / f"image_{k:04d}.png")).astype(int)
        d = int(np.abs(a - b).max())
        same += d == 0
        worst = max(worst, d)
    return same, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 images, one run")
    ap.add_argument("--images", type=int, default=None, help="images per run (default 32, quick 8)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None, help="runs of a, b, c, alternating (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides (0: torch's default)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, images)")
    args = ap.parse_args()
    n = args.images or (8 if args.quick else 32)
    repeat = args.repeat or (1 if args.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="rh-diffusion-"))
    from worker.runtimes.tiny_pipeline import build
    model = build(tmp / "models" / "tiny-sd")
    weights = sum(f.stat().st_size for f in model.rglob("*.safetensors")) >> 10
    print(f"diffusion benchmark: tiny pipeline ({weights} KiB of weights), {n} images of {args.size}x{args.size}, "
          f"{args.steps} steps, CPU ({os.cpu_count()} cores, torch threads: {args.threads or 'default'})", flush=True)
    coord = localfarm.Coordinator(tmp / "coordinator", localfarm.process_env({"RENDERHIVE_LOG": "WARNING"})).start()
    a_runs, b_runs, c_runs = [], [], []
    try:
        for i in range(repeat):
            a = direct(model, tmp / f"a{i}", n, args.steps, args.size, args.threads)
            a_runs.append(a)
            print(f"  a: direct          {a['work_s']:6.2f} s (load {a['load_s']:.2f} s + {n} images; "
                  f"import torch+diffusers {a['import_s']:.2f} s excluded)", flush=True)
            for runs, per_task, tag in ((b_runs, 1, "b"), (c_runs, 4, "c")):
                r = farm_run(coord, tmp, model.parent, f"{tag}{i}", n, args.steps, args.size, per_task,
                             args.threads)
                runs.append(r)
                print(f"  {tag}: farm, {per_task}/task   {r['s']:6.2f} s (submit → rendered, incl. model load and "
                      f"contact sheet; {r['gen_s']:.2f} s inside pipeline calls; worker start-up "
                      f"{r['startup_s']:.1f} s excluded)", flush=True)
    finally:
        coord.stop()
    med = statistics.median
    a_s, b_s, c_s = med(r["work_s"] for r in a_runs), med(r["s"] for r in b_runs), med(r["s"] for r in c_runs)
    rep = f"median of {repeat}, alternating" if repeat > 1 else "one run each"
    print(f"\n[{rep}]")
    print(f"{'mode':<40} {'seconds':>8} {'images/s':>9} {'ratio to a':>11}")
    print("-" * 71)
    for label, s in (("a  direct pipe(...) loop, one process", a_s), ("b  farm, one worker, micro-batch 1", b_s),
                     ("c  farm, one worker, micro-batch 4", c_s)):
        print(f"{label:<40} {s:>8.2f} {n / s:>9.2f} {s / a_s:>11.3f}")
    print(f"farm/direct (micro-batch 1) = {b_s / a_s:.3f} (goal <= 1.15); by best runs "
          f"{min(r['s'] for r in b_runs) / min(r['work_s'] for r in a_runs):.3f}")
    print(f"model load: direct {med(r['load_s'] for r in a_runs):.2f} s; direct per image "
          f"{med(med(r['per_image']) for r in a_runs) * 1000:.0f} ms median")
    ok = True
    for i in range(repeat):
        same_b, worst_b = max_diff(tmp / f"a{i}", tmp / f"b{i}", n)
        same_c, worst_c = max_diff(tmp / f"a{i}", tmp / f"c{i}", n)
        ok &= same_b == n and worst_c <= 1
        print(f"pixels run {i + 1}: micro-batch 1: {same_b}/{n} identical to direct; micro-batch 4: {same_c}/{n} "
              f"identical, max difference {worst_c}/255")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
