"""Stable Diffusion on the farm against the same pipeline called directly, per pipeline kind and
micro-batch, with tiny random-weight models.

    python bench/diffusion.py [--quick] [--kinds txt2img,img2img,inpaint,lora,controlnet] [--batches 1,4]
                              [--images N] [--steps S] [--repeat R] [--threads T] [--keep]

Kinds (``farm models tiny`` and its pieces: random weights, the same code path as real models):

* **txt2img**: tiny-sd, N images of one prompt, 64x64, seeds base+k;
* **img2img**: tiny-sd over the N frames of a render job of the sample scene (64x48, rendered and
  approved once before the runs; not timed), strength 0.6, image i from frame i;
* **inpaint**: tiny-inpaint (9-channel UNet), N images repainting the right half of an uploaded 64x48 image;
* **lora**: tiny-sd with one random LoRA (loras/ink.safetensors) at weight 0.8;
* **controlnet**: tiny-sd with one random ControlNet (controlnets/depth) at 0.8 over an uploaded image.

For each kind and micro-batch k (default 1 and 4):

a. **direct**: one Python process loads the pipeline (``from_pretrained``, plus the LoRA or ControlNet),
   makes one warm-up image, then calls it once per k images with k prompts and k
   ``torch.Generator().manual_seed(base + i)``, as the worker's runtime does, saving each PNG. Timed from
   after the warm-up to the last PNG.
b. **farm**: ``farm serve`` and a fresh ``farm worker --models`` (its start-up excluded), warmed by a
   one-image job of the same kind (not timed: the model and its pieces loaded, as direct's warm-up), then
   one job of N images, k a task. Timed from submit to the coordinator marking the job ``rendered`` (its
   ``updated_at``): every lease, input fetch, PROGRESS, upload and RESULT, and the contact sheet.

Both sides are timed warm because a worker keeps its pipelines loaded between jobs (and its start-up
benchmark already loads the first model), so a cold direct run against a warm farm would flatter the
farm; the load times are printed beside each pair.
Each side also splits its time into the pipeline calls (direct: timed around each ``pipe(...)``; farm: the
runtime's own "seconds" an image, summed over the job's outputs) and the rest: the farm's rest is its own
cost (leases, inputs, the runtime's requests, PNGs, uploads, RESULTs, the deposit, the contact sheet), and
``outside fig`` = 1 + (farm's rest − direct's rest) / direct's fastest pipeline total is the figure that
does not move with the pipeline's speed, which on a shared 2-core VM changes by ±30 % from one process or
run to the next (single-run farm/direct ratios of one kind went from 0.71 to 1.43 in one session).
Every farm image is downloaded and compared with the direct run of the same kind and k: equal within
1/255 (the exit status says so). Runs alternate direct, farm per kind; numbers are medians of ``--repeat``.
The machine may be shared with other work: the spread between runs is load, and the ratio of a run pair is
the figure to read. The farm's cost is fixed per task (about 10-15 ms on a quiet machine), so it weighs
most on these tiny images (tens of milliseconds each); a real model's seconds an image dilute it.
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
KINDS = ("txt2img", "img2img", "inpaint", "lora", "controlnet")
STRENGTH = {"img2img": 0.6, "inpaint": 1.0}
WEIGHT = 0.8

# Run as `python -c DIRECT_SCRIPT CONFIG_JSON`; prints one JSON line. The calls mirror the worker's runtime
# (worker/runtimes/diffusion.py, adapters.py): one pipeline call a micro-batch, a generator an image.
DIRECT_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
os.environ["HF_HUB_OFFLINE"] = "1"
proto = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)
import torch, diffusers
from PIL import Image
t_imported = time.perf_counter()
c = json.loads(sys.argv[1])
if c["threads"]:
    torch.set_num_threads(c["threads"])  # as the farm's runtime does with RENDERHIVE_DIFFUSION_THREADS
kind, model = c["kind"], c["model"]
if kind == "controlnet":
    net = diffusers.ControlNetModel.from_pretrained(c["controlnet"], local_files_only=True)
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=net, local_files_only=True,
                                                                       safety_checker=None, requires_safety_checker=False)
else:
    cls = {"img2img": "StableDiffusionImg2ImgPipeline", "inpaint": "StableDiffusionInpaintPipeline"}.get(
        kind, "StableDiffusionPipeline")
    pipe = getattr(diffusers, cls).from_pretrained(model, local_files_only=True)
if kind == "lora":
    pipe.load_lora_weights(os.path.dirname(c["lora"]), weight_name=os.path.basename(c["lora"]), adapter_name="a0")
    pipe.set_adapters(["a0"], [c["weight"]])
pipe.set_progress_bar_config(disable=True)
t_loaded = time.perf_counter()
def rgb(p, mode="RGB"):
    with Image.open(p) as im:
        return im.convert(mode)
n, k = c["n"], c["batch"]
def run(idx):
    args = dict(prompt=[c["prompt"]] * len(idx), generator=[torch.Generator("cpu").manual_seed(c["seed"] + i) for i in idx],
                num_inference_steps=c["steps"], guidance_scale=7.5, output_type="pil")
    if kind == "img2img":
        args.update(image=[rgb(c["frames"][i]) for i in idx], strength=c["strength"])
    elif kind == "inpaint":
        init = rgb(c["image"])
        args.update(image=[init] * len(idx), mask_image=[rgb(c["mask"], "L")] * len(idx), strength=c["strength"],
                    width=init.width, height=init.height)
    elif kind == "controlnet":
        args.update(image=rgb(c["control_image"]), controlnet_conditioning_scale=c["weight"], width=c["size"],
                    height=c["size"])
    else:
        args.update(width=c["size"], height=c["size"])
    global pipe_s
    t = time.perf_counter()
    with torch.inference_mode():
        images = pipe(**args).images
    pipe_s += time.perf_counter() - t
    return images
pipe_s = 0.0
run([0])  # warm-up, not timed: the first call's one-off costs (the farm's worker is warmed the same way)
t_warm = time.perf_counter()
pipe_s = 0.0
for start in range(0, n, k):
    idx = list(range(start, min(n, start + k)))
    for i, img in zip(idx, run(idx)):
        img.save(os.path.join(c["out"], f"{i:04d}.png"))
t_end = time.perf_counter()
proto.write(json.dumps({"import_s": t_imported - t0, "load_s": t_loaded - t_imported, "warm_s": t_warm - t_loaded,
                        "work_s": t_end - t_warm, "pipe_s": pipe_s}) + "\n")
proto.flush()
"""


def build_models(root: Path) -> dict[str, Path]:
    from worker.runtimes.tiny_pipeline import build, build_controlnet, build_lora
    sd = build(root / "tiny-sd")
    return {"models": root, "tiny-sd": sd, "tiny-inpaint": build(root / "tiny-inpaint", inpaint=True),
            "lora": build_lora(sd, root / "loras" / "ink.safetensors"),
            "controlnet": build_controlnet(sd, root / "controlnets" / "depth")}


def write_inputs(folder: Path) -> dict[str, Path]:
    """The uploaded inputs: a noisy 64x48 picture, its mask (right half white) and a 64x64 control image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "picture.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "control.png")
    return {"image": folder / "picture.png", "mask": folder / "mask.png", "control": folder / "control.png"}


def direct(kind: str, m: dict[str, Path], inputs: dict[str, Path], frames: list[Path], out: Path, n: int,
           steps: int, batch: int, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"kind": kind, "model": str(m["tiny-inpaint" if kind == "inpaint" else "tiny-sd"]), "n": n,
           "steps": steps, "batch": batch, "threads": threads, "out": str(out), "prompt": PROMPT, "seed": SEED,
           "size": 64, "strength": STRENGTH.get(kind), "weight": WEIGHT, "lora": str(m["lora"]),
           "controlnet": str(m["controlnet"]), "control_image": str(inputs["control"]),
           "image": str(inputs["image"]), "mask": str(inputs["mask"]), "frames": [str(f) for f in frames]}
    proc = subprocess.run([PY, "-c", DIRECT_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"direct {kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job_body(kind: str, n: int, steps: int, batch: int, shas: dict[str, str], render_id: int | None) -> dict:
    """The API request of one benchmark job (``n`` images; over ``render_id``'s frames for img2img)."""
    body = {"model": "tiny-inpaint" if kind == "inpaint" else "tiny-sd", "prompts": [PROMPT], "seed": SEED,
            "steps": steps, "per_task": batch}
    if kind == "img2img":
        return {**body, "init_from_job": render_id, "strength": STRENGTH[kind]}
    body["count"] = n
    if kind == "inpaint":
        return {**body, "init_image": shas["image"], "mask": shas["mask"], "strength": STRENGTH[kind]}
    body.update(width=64, height=64)
    if kind == "lora":
        body["loras"] = [{"name": "ink", "weight": WEIGHT}]
    elif kind == "controlnet":
        body["controls"] = [{"name": "depth", "weight": WEIGHT, "image": shas["control"]}]
    return body


def wait_rendered(client, job_id: int, what: str, tmp: Path) -> dict:
    # polled every 0.5 s, as `farm submit --wait` does (overhead.py too): the time is the coordinator's own
    # timestamp, and 20 polls a second (~10 ms of the coordinator's CPU each) delayed its TASKs by ~25 ms
    view = localfarm.wait_for(lambda: (v := client.job(job_id))["status"] in ("rendered", "failed") and v,
                              1200, 0.5, f"job {job_id}")
    if view["status"] != "rendered":
        raise SystemExit(f"job {job_id} ({what}) failed: {view['error']} (logs in {tmp})")
    return view


def farm_run(coord: localfarm.Coordinator, tmp: Path, models: Path, run: str, body: dict, warm: dict,
             threads: int) -> dict:
    """A fresh worker (start-up excluded) warmed by job ``warm`` (not timed: the model, its pieces and the
    pipeline loaded, as direct's warm-up call), then one job; seconds from submit to rendered; images in
    tmp/run."""
    env = localfarm.process_env({"RENDERHIVE_LOG": "WARNING", "HF_HUB_OFFLINE": "1",
                                 "RENDERHIVE_DIFFUSION_THREADS": str(threads)})
    t0 = time.perf_counter()
    w = localfarm.WorkerProc(tmp / f"worker-{run}", coord, f"bench-{run}", env, gpus="none", models=[models]).start()
    try:
        client = coord.admin
        localfarm.wait_for(lambda: any(x["online"] and x["id"] == f"bench-{run}" for x in client.workers()), 240,
                           0.05, "the worker to come online")
        startup = time.perf_counter() - t0
        t_warm = time.time()
        first = client.submit_diffusion(**warm, name=f"{run} warm-up")
        warm_s = wait_rendered(client, first["id"], f"{run} warm-up", tmp)["updated_at"] - t_warm
        t_submit = time.time()
        job = client.submit_diffusion(**body, name=run)
        view = wait_rendered(client, job["id"], run, tmp)
        # the runtime's own time in the pipeline calls (its "seconds" an image): the rest is the farm's
        pipe = sum(float(o.get("render_seconds") or 0) for o in client.outputs(job["id"]) if o["name"].startswith("image_"))
        client.approve(job["id"])  # full-resolution images are released on approval
        client.download_results(job["id"], tmp / run)
        return {"s": view["updated_at"] - t_submit, "pipe_s": pipe, "startup_s": startup, "warm_s": warm_s}
    finally:
        w.stop()


def render_source(coord: localfarm.Coordinator, tmp: Path, models: Path, n: int) -> tuple[int, int, list[Path]]:
    """The img2img sources: frames 1..n of the sample scene at 64x48, rendered, approved and downloaded once,
    and frame 1 alone (the farm's warm-up job starts from it). Returns (job, warm-up job, frame paths)."""
    w = localfarm.WorkerProc(tmp / "worker-render", coord, "bench-render",
                             localfarm.process_env({"RENDERHIVE_LOG": "WARNING"}), gpus="none", models=[models]).start()
    try:
        client = coord.admin
        sha, _ = client.upload_if_missing(ROOT / "sample_scenes" / "turntable.blend")
        one, job = (client.submit(scene_sha256=sha, frames=frames, resolution_percent=20, samples=4,
                                  name="img2img source") for frames in ("1", f"1-{n}"))
        for j in (one, job):
            wait_rendered(client, j["id"], "the source render", tmp)
            client.approve(j["id"])
        paths = client.download_results(job["id"], tmp / "frames")
        return job["id"], one["id"], sorted(p for p in paths if p.name.startswith("frame_"))
    finally:
        w.stop()


def compare(direct_dir: Path, farm_dir: Path, n: int) -> tuple[int, int]:
    """(images pixel-identical, largest channel difference /255) of the farm's images against direct's."""
    farm = sorted(p for p in farm_dir.iterdir() if p.name.startswith("image_"))
    if len(farm) != n:
        return 0, 255
    same, worst = 0, 0
    for i, path in enumerate(farm):  # image_0003.png or image_0003_frame_0004.png: sorted by index
        a = np.asarray(Image.open(direct_dir / f"{i:04d}.png")).astype(int)
        b = np.asarray(Image.open(path)).astype(int)
        d = int(np.abs(a - b).max()) if a.shape == b.shape else 255
        same, worst = same + (d == 0), max(worst, d)
    return same, worst


def outside(r: dict) -> float:
    """1 + (farm's time outside the pipeline calls - direct's) / direct's fastest pipeline total (medians)."""
    med = statistics.median
    return 1 + (med(r["out_b"]) - med(r["out_a"])) / min(r["pipe_a"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 images, one run")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--batches", default="1,4", help="micro-batches (images a task), comma-separated")
    ap.add_argument("--images", type=int, default=None, help="images per run (default 16, quick 8)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=None, help="runs of each pair (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides (0: torch's default)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, images)")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: unknown {', '.join(sorted(set(kinds) - set(KINDS)))}; pick from {', '.join(KINDS)}")
    batches = [int(b) for b in args.batches.split(",")]
    n = args.images or (8 if args.quick else 16)
    repeat = args.repeat or (1 if args.quick else 2)
    tmp = Path(tempfile.mkdtemp(prefix="rh-diffusion-"))
    m = build_models(tmp / "models")
    inputs = write_inputs(tmp / "inputs")
    print(f"diffusion benchmark: tiny pipelines, {n} images a job, {args.steps} steps, CPU ({os.cpu_count()} cores, "
          f"torch threads: {args.threads or 'default'}); kinds {', '.join(kinds)}; micro-batches "
          f"{', '.join(map(str, batches))}; {repeat} run(s) each. Machine load now: {os.getloadavg()[0]:.1f}",
          flush=True)
    coord = localfarm.Coordinator(tmp / "coordinator", localfarm.process_env({"RENDERHIVE_LOG": "WARNING"})).start()
    results: dict[tuple[str, int], dict[str, list]] = {}
    ok = True
    try:
        client = coord.admin
        shas = {k: client.upload_if_missing(p)[0] for k, p in inputs.items()}
        render_id, warm_id, frames = render_source(coord, tmp, m["models"], n) if "img2img" in kinds else (None, None, [])
        for i in range(repeat):
            for kind in kinds:
                for batch in batches:
                    tag = f"{kind}-{batch}-{i}"
                    a = direct(kind, m, inputs, frames, tmp / f"direct-{tag}", n, args.steps, batch, args.threads)
                    body = job_body(kind, n, args.steps, batch, shas, render_id)
                    warm = {**job_body(kind, 1, args.steps, 1, shas, warm_id), "seed": SEED + 10_000}
                    b = farm_run(coord, tmp, m["models"], f"farm-{tag}", body, warm, args.threads)
                    same, worst = compare(tmp / f"direct-{tag}", tmp / f"farm-{tag}", n)
                    ok &= worst <= 1
                    r = results.setdefault((kind, batch), {"a": [], "b": [], "ratio": [], "same": [], "worst": [],
                                                           "out_a": [], "out_b": [], "pipe_a": []})
                    r["out_a"].append(a["work_s"] - a["pipe_s"])
                    r["out_b"].append(b["s"] - b["pipe_s"])
                    r["pipe_a"].append(a["pipe_s"])
                    r["a"].append(a["work_s"])
                    r["b"].append(b["s"])
                    r["ratio"].append(b["s"] / a["work_s"])
                    r["same"].append(same)
                    r["worst"].append(worst)
                    print(f"  {kind:<10} k={batch}  direct {a['work_s']:6.2f} s  farm {b['s']:6.2f} s  farm/direct "
                          f"{b['s'] / a['work_s']:.3f}  outside the pipeline calls: direct {a['work_s'] - a['pipe_s']:.2f} s, farm "
                          f"{b['s'] - b['pipe_s']:.2f} s  pixels {same}/{n} identical, max diff {worst}/255  (not "
                          f"timed: direct load {a['load_s']:.2f} s + warm-up {a['warm_s']:.2f} s, farm worker start-up "
                          f"{b['startup_s']:.1f} s + warm-up job {b['warm_s']:.2f} s)", flush=True)
    finally:
        coord.stop()
    med = statistics.median
    print(f"\n[median of {repeat}, direct and farm alternating; load average at the end "
          f"{os.getloadavg()[0]:.1f}]" if repeat > 1 else "\n[one run each]")
    print(f"{'kind':<11} {'batch':>5} {'direct s':>9} {'farm s':>8} {'direct img/s':>13} {'farm img/s':>11} "
          f"{'farm/direct':>12} {'outside fig':>12} {'identical':>10} {'max diff':>9}")
    print("-" * 109)
    for (kind, batch), r in results.items():
        a_s, b_s = med(r["a"]), med(r["b"])
        print(f"{kind:<11} {batch:>5} {a_s:>9.2f} {b_s:>8.2f} {n / a_s:>13.2f} {n / b_s:>11.2f} "
              f"{med(r['ratio']):>12.3f} {outside(r):>12.3f} {min(r['same']):>6}/{n:<3} {max(r['worst']):>7}/255")
    ratios = [med(r["ratio"]) for r in results.values()]
    figs = [outside(r) for r in results.values()]
    print(f"farm/direct: median {med(ratios):.3f}, worst {max(ratios):.3f} (goal <= 1.05); from the time outside the "
          f"pipeline calls: median {med(figs):.3f}, worst {max(figs):.3f}; pixels within 1/255 everywhere: "
          f"{'yes' if ok else 'NO'}")
    print("('outside fig' = 1 + (farm's time outside its pipeline calls - direct's) / direct's fastest pipeline "
          "total: the farm's own cost, insensitive to the pipeline's speed changing from one process or run to "
          "the next, which on a shared 2-core VM moves single runs by +-30 %)")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
