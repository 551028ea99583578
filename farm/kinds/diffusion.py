"""Stable Diffusion jobs: validating a request, planning its image tasks with recorded seeds, and chaining
img2img jobs onto the render jobs whose frames they start from.

A txt2img job makes ``count`` images of each prompt: image k (``image_0003.png``) is prompt ``k // count``
with seed ``seed + k``. An img2img job (``init_from_job``) makes one image per PNG frame of an earlier job:
image i starts from frame i (``image_0003_frame_0004.png``), prompts taken in turn, seed ``seed + i``.
An inpainting job (``mask`` and ``init_image``: uploaded PNG blobs, :mod:`farm.kinds.diffusion_inputs`)
makes ``count`` images of each prompt like txt2img, each repainting the white part of the mask in the image.
Any of them may name ControlNets (``controls``: name, weight, control image blob), all applied to every image,
or take them from a render job's passes (``control_from_job``); ``mask_from_job`` J inpaints over J's frames with
each frame's mask pass; ``embeddings``, an ``upscale`` post-process and an SDXL ``refiner`` are pieces pinned
like LoRAs.
Images are grouped ``per_task`` to a task (micro-batches); one more task, ``contact_sheet``, waits for all
of them. Every seed, prompt and setting is in the task's spec and in the job's spec, so any image can be
made again. Invariants:

* nothing is written for an invalid request: every check raises :class:`farm.kinds.jobs.JobError` first;
* the model and its LoRAs are pinned at submit (:mod:`farm.kinds.diffusion_pieces`): the request names
  them (and may pin their hashes); the job records the hashes (LoRAs also in ``pieces``), and tasks go only
  to workers that advertised all of them (see :func:`farm.core.scheduler.fits`). A name that no registered
  worker ever advertised is an error; so is a piece whose every copy is corrupt;
* prompts are checked against the tokenizer's limit here when the coordinator has the model's folder
  (``RENDERHIVE_MODELS`` or its hub cache, matched by name); the worker's runtime checks again in any case
  and fails the task for good, so an over-long prompt is never silently truncated;
* an img2img job whose source is not rendered yet starts with every image task ``waiting``; when the
  source job becomes rendered, :func:`on_job_status` (called by the coordinator, on its thread) gives each
  task its frames as inputs and queues it; when the source fails or is canceled, the waiting job fails.
"""
from __future__ import annotations

import math
import random
import re
import time
from typing import Any

from sqlmodel import Session, select

from common import limits as L
from common import model_folders
from common.limits import pass_output
from farm import constants as C
from farm.kinds import vram
from farm.kinds.diffusion_inputs import control_inputs, inpaint_inputs
from farm.kinds.diffusion_pieces import (
    check_held_together,
    parse_controls,
    parse_embeddings,
    parse_loras,
    parse_refiner,
    parse_upscale,
    resolve_controls,
    resolve_embeddings,
    resolve_loras,
    resolve_model,
    resolve_refiner,
    resolve_upscale,
)
from farm.kinds.frames import TaskPlan
from farm.kinds.jobs import JobError, get_job, job_for_key, min_tier, store_plans
from farm.store.blobs import BlobStore
from farm.store.models import Job, Output, Task, User
from farm.store.states import JobStatus, TaskStatus, transition

SHEET_NAME = "contact_sheet.png"
FRAME_NAME = re.compile(r"^(?:frame|image)_(\d+)[^/]*\.png$")
MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1 - C.MAX_DIFFUSION_IMAGES
SOURCE_DONE = (JobStatus.approved.value, JobStatus.paid.value)
"""Source job states whose frames an img2img job may start from: released, i.e. approved (fair exchange:
frames nobody has paid for feed no other job)."""
SOURCE_DEAD = (JobStatus.failed.value, JobStatus.canceled.value)


def image_name(k: int, frame: int | None = None) -> str:
    return f"image_{k:04d}.png" if frame is None else f"image_{k:04d}_frame_{frame:04d}.png"


# ------------------------------------------------------------------ models
def check_prompts(name: str, texts: list[tuple[str, str]]) -> bool:
    """Raise JobError for a text over the token limit of the coordinator's copy of model ``name``.
    Returns False when the coordinator has no such folder (the worker's runtime checks then)."""
    path = dict(model_folders.find(model_folders.configured_dirs(), hub=True)).get(name)
    if path is None or not (path / "tokenizer").is_dir():
        return False
    try:
        count, limit = model_folders.token_counter(path)
    except Exception:  # an unreadable tokenizer here does not make the request wrong
        return False
    for what, text in texts:
        n = count(text)
        if n > limit:
            raise JobError(f"{what} is {n} tokens long, over the limit of {limit} tokens of {name!r} "
                           f"(start and end tokens included): shorten it")
    return True


# ------------------------------------------------------------------ validation and planning
def _int(req: dict, key: str, default: Any, lo: int, hi: int, hint: str = "") -> int:
    val = req.get(key)
    val = default if val is None else val
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        raise JobError(f"{key} must be a whole number from {lo} to {hi}{hint} (got {val!r})")
    return val


def _settings(req: dict) -> dict[str, Any]:
    steps = _int(req, "steps", 30, 1, C.MAX_DIFFUSION_STEPS)
    guidance = req.get("guidance", 7.5)
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= 50:
        raise JobError(f"guidance must be a number from 0 to 50 (got {guidance!r})")
    size = {}
    for key in ("width", "height"):
        v = req.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v % 8 or not 64 <= v <= C.MAX_DIFFUSION_SIDE:
            raise JobError(f"size {req.get('width')}x{req.get('height')}: width and height must be multiples of 8 "
                           f"from 64 to {C.MAX_DIFFUSION_SIDE} (e.g. 512x512)")
        size[key] = v
    if len(size) == 1:
        raise JobError("give both width and height (--size WxH), or neither")
    scheduler = str(req.get("scheduler") or "default")
    if scheduler != "default" and scheduler not in L.DIFFUSION_SCHEDULERS:
        raise JobError(f"unknown scheduler {scheduler!r}: use default or one of {', '.join(L.DIFFUSION_SCHEDULERS)}")
    return {"steps": steps, "guidance": float(guidance), "scheduler": scheduler,
            "width": size.get("width"), "height": size.get("height")}


def _prompts(req: dict) -> tuple[list[str], str]:
    prompts = req.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise JobError("give at least one non-empty prompt (--prompt \"…\" or --prompt-file FILE)")
    if len(prompts) > MAX_PROMPTS:
        raise JobError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} in one job, split the file")
    negative = req.get("negative") or ""
    if not isinstance(negative, str):
        raise JobError("negative must be a string")
    for p in [*prompts, negative]:
        if len(p) > MAX_PROMPT_CHARS:
            raise JobError(f"a prompt of {len(p)} characters is far over the model's token limit: shorten it")
    return [p.strip() for p in prompts], negative.strip()


def _source_frames(session: Session, owner: User, src_id: int) -> tuple[Job, list[tuple[int, str]]]:
    """(source job, [(frame number, output name)] of its PNG frames in frame order)."""
    src = get_job(session, src_id, owner)  # 404 for another creator's job
    if src.status in SOURCE_DEAD:
        raise JobError(f"job {src_id} ended {src.status}: it has no frames to start from", 409)
    names = []
    for t in session.exec(select(Task).where(Task.job_id == src.id)):
        if t.spec.get("final", True):
            names += [n for n in t.spec.get("outputs", []) if FRAME_NAME.match(n)]
    if not names:
        raise JobError(f"job {src_id} makes no PNG frames to start from (EXR frames cannot be init images: "
                       "render the source as PNG)")
    frames = sorted((int(FRAME_NAME.match(n).group(1)), n) for n in set(names))
    return src, frames


def create_diffusion_job(session: Session, owner: User, req: dict[str, Any], blobs: BlobStore | None = None) -> Job:
    """Validate a diffusion request and store the job and its tasks. Raises JobError before writing.
    ``blobs``: where an inpainting job's uploaded image and mask are (checked here)."""
    client_key = str(req.get("client_key") or "")[:100]
    existing = job_for_key(session, owner, client_key)
    if existing:
        return existing
    prompts, negative = _prompts(req)
    settings = _settings(req)
    loras = parse_loras(req.get("loras"))
    controls = parse_controls(req.get("controls"))
    embeddings = parse_embeddings(req.get("embeddings"))
    upscale = parse_upscale(req.get("upscale"), settings)
    refiner = parse_refiner(req.get("refiner"), settings["steps"])
    per_task = _int(req, "per_task", 1, 1, C.MAX_DIFFUSION_PER_TASK, " images per task")
    seed = req.get("seed")
    seed = random.SystemRandom().randrange(2**32) if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise JobError(f"seed must be a whole number from 0 to {MAX_SEED}")
    src_id = req.get("init_from_job")
    strength = req.get("strength")
    inputs: dict[str, str] = {}
    mask_src, control_src = req.get("mask_from_job"), req.get("control_from_job")
    if req.get("mask") and (src_id is not None or mask_src is not None):
        raise JobError("give the mask either as a file (--mask with --image) or as a render job's mask pass "
                       "(--mask-from-job), not both; over another job's frames use --mask-from-job")
    if mask_src is not None and src_id is not None:
        raise JobError("--mask-from-job J inpaints over J's frames already: leave out --init-from-job")
    frame_src = mask_src if mask_src is not None else src_id  # the job whose frames are the init images
    if control_src is not None and frame_src is not None and int(control_src) != int(frame_src):
        raise JobError(f"the render passes (job {control_src}) and the frames (job {frame_src}) must come from the "
                       "same render job: image i takes frame i and that frame's passes")
    if control_src is not None:
        passes = _control_passes(controls)
    elif controls:
        inputs = control_inputs(blobs, controls)
    if req.get("mask"):
        pictures, (w, h) = inpaint_inputs(blobs, req)
        inputs = {**inputs, **pictures}
        settings["width"] = settings["width"] or max(8, w // 8 * 8)
        settings["height"] = settings["height"] or max(8, h // 8 * 8)
    if req.get("mask") or frame_src is not None:  # inpainting (strength 1) or img2img (0.5) by default
        strength = (1.0 if req.get("mask") or mask_src is not None else 0.5) if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise JobError(f"strength must be a number above 0 and at most 1 (got {strength!r})")
        if int(settings["steps"] * strength) < 1:
            raise JobError(f"steps × strength = {settings['steps']} × {strength} is under one denoising step: "
                           "raise --steps or --strength")
    if control_src is not None or frame_src is not None:  # image i from frame i of that job (and its passes)
        if req.get("count") not in (None, 1):
            raise JobError("with a source job (init_from_job, mask_from_job, control_from_job) each source frame "
                           "gives one image: leave count at 1")
        src, frames = _source_frames(session, owner, int(frame_src if frame_src is not None else control_src))
        if len(frames) > C.MAX_DIFFUSION_IMAGES:
            raise JobError(f"job {src.id} has {len(frames)} frames: at most {C.MAX_DIFFUSION_IMAGES} images "
                           "in one job")
        rendered = (src.spec.get("settings") or {}).get("passes") or []
        for c, name in zip(controls, passes if control_src is not None else []):
            if name not in rendered:
                raise JobError(f"job {src.id} rendered no {name} pass for ControlNet {c['name']!r}: render it with "
                               f"--passes {','.join(sorted({*rendered, name}))}, or pick a ControlNet of one of "
                               f"its passes ({', '.join(rendered) or 'none'})")
        if mask_src is not None and "mask" not in rendered:
            raise JobError(f"job {src.id} rendered no mask pass to inpaint with: render it with --passes "
                           f"{','.join(sorted({*rendered, 'mask'}))}")
        images = [{"name": image_name(i, f), "index": i, "seed": seed + i, "prompt": prompts[i % len(prompts)],
                   "negative": negative, "source": {"job": src.id, "frame": f, "name": fname},
                   **({"init_name": fname} if frame_src is not None else {}),
                   **({"mask_name": pass_output("mask", f)} if mask_src is not None else {}),
                   **({"control_names": [pass_output(name, f) for name in passes]} if control_src is not None else {})}
                  for i, (f, fname) in enumerate(frames)]
        mode = "inpaint" if mask_src is not None else "img2img" if src_id is not None else "txt2img"
    else:
        count = _int(req, "count", 1, 1, C.MAX_DIFFUSION_IMAGES, " images per prompt")
        if count * len(prompts) > C.MAX_DIFFUSION_IMAGES:
            raise JobError(f"{len(prompts)} prompts × {count} = {count * len(prompts)} images: at most "
                           f"{C.MAX_DIFFUSION_IMAGES} in one job, split it into several jobs")
        settings["width"] = settings["width"] or 512
        settings["height"] = settings["height"] or 512
        images = [{"name": image_name(k), "index": k, "seed": seed + k, "prompt": prompts[k // count],
                   "negative": negative} for k in range(count * len(prompts))]
        src, mode = None, "inpaint" if req.get("mask") else "txt2img"
    model = str(req.get("model") or "").strip()
    model_hash = resolve_model(session, model, str(req.get("model_hash") or ""))
    loras = resolve_loras(session, loras)
    controls = [{"name": c["name"], "hash": c["hash"], "weight": c["weight"],
                 **({"pass": passes[i]} if control_src is not None else {"image_sha256": c["image"]})}
                for i, c in enumerate(resolve_controls(session, controls))]
    if refiner and (mode != "txt2img" or controls):
        raise JobError("the SDXL refiner follows text-to-image only: leave out --refiner, or the image, mask, source "
                       "job and ControlNets")
    embeddings, upscale = resolve_embeddings(session, embeddings), resolve_upscale(session, upscale)
    refiner = resolve_refiner(session, refiner)
    extra = embeddings + [p for p in (upscale, refiner) if p]  # pieces beyond LoRAs and ControlNets
    check_held_together(session, model, model_hash, loras + controls + extra)
    need = vram.job_need(session, model, model_hash, loras, controls, *vram.booked_size(settings, src), per_task,
                         refiner, upscale)
    vram.check_some_worker_fits(session, need, model, {model_hash, *(p["hash"] for p in loras + controls + extra)})
    checked = check_prompts(model, [(f"prompt {i + 1}", p) for i, p in enumerate(prompts)]
                            + ([("the negative prompt", negative)] if negative else []))
    common = {"model": model, "model_hash": model_hash, "mode": mode, **settings,
              **({"loras": loras} if loras else {}), **({"controls": controls} if controls else {}),
              **({"embeddings": embeddings} if embeddings else {}), **({"upscale": upscale} if upscale else {}),
              **({"refiner": refiner} if refiner else {}),
              **({"pieces": sorted({p["hash"] for p in loras + controls + extra})} if loras or controls or extra
                 else {}),
              **({"strength": float(strength)} if mode in ("img2img", "inpaint") else {}),
              **({"input_names": inputs} if inputs else {}), **({"memory_need": need} if need else {})}
    held = src is not None and src.status not in SOURCE_DONE
    plans = []
    for i in range(0, len(images), per_task):
        batch = images[i:i + per_task]
        plans.append(TaskPlan("diffusion", {**common, "images": batch}, list(dict.fromkeys(inputs.values())),
                              [im["name"] for im in batch],
                              units=len(batch), held=held))
    labels = [{"name": im["name"], "label": f"#{im['index']} seed {im['seed']}"} for im in images]
    last = max(im.get("source", {}).get("frame", im["index"]) for im in images)  # outputs list in frame order
    plans.append(TaskPlan("contact_sheet", {"images": labels, "frame": last + 1}, [], [SHEET_NAME],
                          needs=list(range(len(plans)))))
    per_prompt = len(images) // len(prompts) if mode == "txt2img" and src is None else 1
    spec = {**common, "prompts": prompts, "negative": negative, "seed": seed, "count": per_prompt,
            "per_task": per_task, "images_total": len(images), "init_from_job": src.id if src else None,
            **({"control_from_job": src.id} if control_src is not None else {}),
            **({"mask_from_job": src.id} if mask_src is not None else {}),
            "prompts_checked": checked, "client_key": client_key, "min_tier": min_tier(req)}
    job = store_plans(session, owner, "diffusion", str(req.get("name") or "")[:200] or f"{mode} {model}",
                      int(req.get("priority") or 0), spec, plans,
                      f"{len(images)} images of {model}, seeds {seed}-{seed + len(images) - 1}")
    if src is not None and not held:  # the frames exist already: the tasks are queued with them
        session.flush()
        problem = _release(session, job, src, time.time(), queue=False)
        if problem:  # raised before the caller commits: nothing is written
            raise JobError(problem, 409)
    return job


def _control_passes(controls: list[dict]) -> list[str]:
    """The render pass each control of a control_from_job request takes (its ``pass``, else its name)."""
    if not controls:
        raise JobError("control_from_job needs at least one ControlNet: --control NAME[:WEIGHT], named like the "
                       f"pass it takes ({', '.join(L.RENDER_PASSES)}) or with a pass given (API: render_pass)")
    passes = []
    for c in controls:
        if c.get("image"):
            raise JobError("with control_from_job the control images are that job's render passes: leave out "
                           "--control-image")
        name = c.get("pass") or c["name"]
        if name not in L.RENDER_PASSES:
            raise JobError(f"ControlNet {c['name']!r} takes which render pass? Name it like one "
                           f"({', '.join(L.RENDER_PASSES)}) or give its pass (API: render_pass)")
        passes.append(name)
    return passes


# ------------------------------------------------------------------ job-level dependencies
def _release(session: Session, job: Job, src: Job, now: float, queue: bool = True) -> str:
    """Give ``job``'s image tasks the frames of ``src`` as inputs (queue them when ``queue``).
    Returns why it could not ("" when done)."""
    outs = {o.name: o for o in session.exec(select(Output).where(Output.job_id == src.id).where(Output.final))}
    tasks = session.exec(select(Task).where(Task.job_id == job.id).where(Task.kind == "diffusion")).all()
    for task in tasks:
        images = [dict(im) for im in task.spec.get("images", [])]
        names = [n for im in images for n in ([im["init_name"]] if im.get("init_name") else [])
                 + ([im["mask_name"]] if im.get("mask_name") else [])
                 + im.get("control_names", [])]  # an img2img frame (its mask pass), a ControlNet job's passes
        missing = [n for n in names if n not in outs]
        if missing:
            return f"source job {src.id} has no output {missing[0]}"
        for im in images:
            shas = {"sha256": outs[im["init_name"]].sha256} if im.get("init_name") else {}
            if im.get("mask_name"):
                shas["mask_sha256"] = outs[im["mask_name"]].sha256
            if im.get("control_names"):
                shas["control_sha256"] = [outs[n].sha256 for n in im["control_names"]]
            im["source"] = {**im["source"], **shas}
        uploaded = {k: v for k, v in (job.spec.get("input_names") or {}).items()}  # e.g. control images
        named = {**uploaded, **{n: outs[n].sha256 for n in names}}
        task.inputs = list(dict.fromkeys(named.values()))
        task.spec = {**task.spec, "images": images, "input_names": named}
        session.add(task)
        if queue and task.status == TaskStatus.waiting.value:
            transition(session, task, TaskStatus.queued, reason=f"source job {src.id} is rendered", now=now)
    return ""


def _fail(session: Session, job: Job, reason: str, now: float) -> None:
    for task in session.exec(select(Task).where(Task.job_id == job.id).where(Task.status == TaskStatus.waiting.value)):
        transition(session, task, TaskStatus.canceled, reason=reason, now=now)
    job.error = reason
    transition(session, job, JobStatus.canceled if job.status == JobStatus.paused.value else JobStatus.failed,
               reason=reason, now=now)


def release_ready(session: Session, now: float) -> bool:
    """Release (or fail) the img2img jobs whose source job has been approved (or ended) since: approval
    happens off the coordinator's thread (the web page, the review window), so the core sweeps for it.
    One query when nothing waits. Returns True when tasks were queued."""
    waiting_on = (select(Job.spec["init_from_job"].as_integer()).where(Job.kind == "diffusion")
                  .where(Job.status.in_([JobStatus.queued.value, JobStatus.paused.value])))
    queued = False
    for src in session.exec(select(Job).where(Job.id.in_(waiting_on.scalar_subquery()))
                            .where(Job.status.in_(SOURCE_DONE + SOURCE_DEAD))).all():
        queued = on_job_status(session, src, now) or queued
    return queued


def on_job_status(session: Session, job: Job, now: float) -> bool:
    """Hook for the coordinator after ``job`` changed status: release the img2img jobs waiting for it when
    it is approved, fail them when it failed or was canceled. Returns True when tasks were queued."""
    if job.status not in SOURCE_DONE + SOURCE_DEAD:
        return False
    queued = False
    for dep in session.exec(select(Job).where(Job.kind == "diffusion")
                            .where(Job.spec["init_from_job"].as_integer() == job.id)
                            .where(Job.status.in_([JobStatus.queued.value, JobStatus.paused.value]))).all():
        waiting = session.exec(select(Task.id).where(Task.job_id == dep.id).where(Task.kind == "diffusion")
                               .where(Task.status == TaskStatus.waiting.value)).first()
        if waiting is None:
            continue
        if job.status in SOURCE_DEAD:
            _fail(session, dep, f"source job {job.id} {job.status}: no frames to start from", now)
            continue
        problem = _release(session, dep, job, now)
        if problem:
            _fail(session, dep, problem, now)
        else:
            queued = True
    return queued
