"""Worker executors of Stable Diffusion jobs: ``diffusion`` (images, in the slot's diffusion runtime child)
and ``contact_sheet`` (a grid of the job's images, drawn with Pillow in a daemon thread).

Registered in :data:`worker.tasks.executors.EXECUTORS`. The daemon never imports torch: generation happens in
:mod:`worker.runtimes.diffusion`; this module only translates a task's spec into a runtime request and the
runtime's events into progress and produced files. Invariants:

* a task runs only on the model folder and LoRA, ControlNet, embedding and upscaler files whose hashes the job pinned (``ctx.models``: hash →
  path, from the daemon's scan of its own folders; a job never names a path); a worker asked for a piece
  it does not hold fails the task as retryable (another worker has it) and never substitutes another version;
* every image keeps the name, index and seed the coordinator planned; an img2img image gets the local
  path of its source frame (``spec["input_names"]``) and records where it came from in its metadata;
* the contact sheet is laid out in image-index order with each image's index and seed under it.
"""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

from worker.tasks.executors import Produced, TaskContext, TaskFailure

SHEET_NAME = "contact_sheet.png"
SHEET_MAX_WIDTH = 2048   # pixels; thumbnails shrink to keep a big job's sheet openable
THUMB_MAX = 256
LABEL_HEIGHT = 14
LABEL_MIN_WIDTH = 96     # a cell is at least this wide, so "#12 seed 1234567" fits under a small image
REQUEST_KEYS = ("mode", "steps", "guidance", "width", "height", "scheduler", "strength")


def runtime_request(ctx: TaskContext) -> dict:
    """The ``generate`` request for this task's images (see the protocol in worker.runtimes.diffusion)."""
    spec = ctx.spec
    path = ctx.models.get(spec.get("model_hash", ""))
    if path is None:
        raise TaskFailure(f"this worker does not hold model {spec.get('model')!r} with hash "
                          f"{str(spec.get('model_hash'))[:12]}… (it advertises {len(ctx.models)} models): "
                          "another worker will take the task", True)
    images = []
    for im in spec.get("images", []):
        item = {k: im[k] for k in ("name", "index", "seed", "prompt", "negative") if k in im}
        if im.get("init_name"):  # img2img or inpainting over a source job's frame (its mask pass the mask)
            try:
                item["init"] = str(ctx.input_named(im["init_name"]))
                if im.get("mask_name"):
                    item["mask"] = str(ctx.input_named(im["mask_name"]))
            except KeyError:
                raise TaskFailure(f"source frame {im.get('init_name')} of image {im.get('index')} (or its mask "
                                  "pass) was not delivered with the task", True) from None
            item["source"] = im.get("source") or {}
        elif spec.get("mode") == "inpaint":
            try:
                item["init"], item["mask"] = (str(ctx.input_named(n)) for n in ("init.png", "mask.png"))
            except KeyError:
                raise TaskFailure("the image or mask of the inpainting job was not delivered with the task",
                                  True) from None
            item["source"] = {"init_sha256": spec["input_names"]["init.png"],
                              "mask_sha256": spec["input_names"]["mask.png"]}
        if im.get("control_names"):
            try:
                item["control_images"] = [str(ctx.input_named(n)) for n in im["control_names"]]
            except KeyError:
                raise TaskFailure(f"the render passes of image {im.get('index')} were not delivered with the task",
                                  True) from None
            item["source"] = {**item.get("source", {}), **(im.get("source") or {})}
        images.append(item)
    loras = []
    for lo in spec.get("loras") or []:
        lpath = ctx.models.get(str(lo.get("hash") or ""))
        if lpath is None:
            raise TaskFailure(f"this worker does not hold LoRA {lo.get('name')!r} with hash "
                              f"{str(lo.get('hash'))[:12]}…: another worker will take the task", True)
        loras.append({"name": lo["name"], "hash": lo["hash"], "weight": float(lo["weight"]), "path": str(lpath)})
    controls = []
    for i, c in enumerate(spec.get("controls") or []):
        cpath = ctx.models.get(str(c.get("hash") or ""))
        if cpath is None:
            raise TaskFailure(f"this worker does not hold ControlNet {c.get('name')!r} with hash "
                              f"{str(c.get('hash'))[:12]}…: another worker will take the task", True)
        try:  # an uploaded image for the whole job, or per image its frame's render pass (below)
            image = str(ctx.input_named(f"control_{i}.png")) if c.get("image_sha256") else None
        except KeyError:
            raise TaskFailure(f"the control image of {c.get('name')!r} was not delivered with the task", True) from None
        controls.append({**{k: c[k] for k in ("name", "hash", "weight", "image_sha256", "pass") if k in c},
                         "path": str(cpath), "image": image})
    embeddings = [{"name": e["name"], "hash": e["hash"], "token": e["token"], "path": str(_piece(ctx, e, "embedding"))}
                  for e in spec.get("embeddings") or []]
    up = spec.get("upscale")
    upscale = {**{k: up[k] for k in ("name", "hash", "steps", "noise_level", "scale") if k in up},
               "path": str(_piece(ctx, up, "upscaler"))} if up else None
    ref = spec.get("refiner")
    refiner = {**{k: ref[k] for k in ("name", "hash", "switch")}, "path": str(_piece(ctx, ref, "refiner"))} \
        if ref else None
    return {"op": "generate", "model_path": str(path), "model_name": spec.get("model", ""),
            "model_hash": spec["model_hash"], "out_dir": str(ctx.out_dir), "images": images, "loras": loras,
            "controls": controls, "embeddings": embeddings, "upscale": upscale, "refiner": refiner,
            **{k: spec.get(k) for k in REQUEST_KEYS}}


def _piece(ctx: TaskContext, piece: dict, what: str) -> Path:
    """The local path of a pinned piece (an embedding, an upscaler); TaskFailure (retryable) when not held."""
    path = ctx.models.get(str(piece.get("hash") or ""))
    if path is None:
        raise TaskFailure(f"this worker does not hold {what} {piece.get('name')!r} with hash "
                          f"{str(piece.get('hash'))[:12]}…: another worker will take the task", True)
    return Path(path)


async def diffusion(ctx: TaskContext) -> list[Produced]:
    """Images of a txt2img or img2img task, generated by the slot's long-lived diffusion runtime."""
    request = runtime_request(ctx)
    frames = {im["name"]: (im.get("source") or {}).get("frame", im["index"]) for im in ctx.spec["images"]}
    total = len(request["images"])
    rt = await ctx.runtime()
    produced, done = [], 0
    async for ev in rt.request(request):
        if ev.get("event") == "image":
            done += 1
            if done < total:  # the RESULT follows the last image at once: its PROGRESS would be one more commit
                ctx.progress(done, total, f"image {ev.get('index')}")
        elif ev.get("event") == "error":
            raise TaskFailure(ev.get("message", "generation failed"), bool(ev.get("retryable", False)))
        elif ev.get("event") == "done":
            produced = [Produced(o["name"], Path(o["path"]), int(frames.get(o["name"], o["index"])),
                                 float(o.get("seconds", 0.0))) for o in ev["outputs"]]
    return produced


def draw_sheet(items: list[tuple[Path, str]], out: Path) -> Path:
    """A grid of thumbnails (in order) with a label under each, as a PNG at ``out``."""
    from PIL import Image, ImageDraw
    cols = max(1, math.ceil(math.sqrt(len(items))))
    rows = max(1, math.ceil(len(items) / cols))
    largest = 0
    for path, _label in items:  # headers only: small images are not blown up into big empty cells
        with Image.open(path) as src:
            largest = max(largest, *src.size)
    thumb = max(16, min(THUMB_MAX, SHEET_MAX_WIDTH // cols, max(LABEL_MIN_WIDTH, largest)))
    cell_h = thumb + LABEL_HEIGHT
    sheet = Image.new("RGB", (cols * thumb, rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (path, label) in enumerate(items):
        x, y = (i % cols) * thumb, (i // cols) * cell_h
        with Image.open(path) as src:
            img = src.convert("RGB")
        img.thumbnail((thumb, thumb))
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x + 2, y + thumb + 1), label[: max(4, thumb // 6)], fill=(220, 220, 220))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


async def contact_sheet(ctx: TaskContext) -> list[Produced]:
    """The job's contact sheet, from the images of the tasks it waited for."""
    entries = ctx.spec.get("images", [])
    try:
        items = [(ctx.input_named(e["name"]), str(e.get("label", e["name"]))) for e in entries]
    except KeyError as exc:
        raise TaskFailure(f"image {exc} was not delivered with the contact sheet task", True) from None
    try:
        path = await asyncio.to_thread(draw_sheet, items, ctx.out_dir / SHEET_NAME)
    except OSError as exc:
        raise TaskFailure(f"cannot draw the contact sheet: {exc}", True) from None
    return [Produced(SHEET_NAME, path, frame=int(ctx.spec.get("frame", len(entries))))]
