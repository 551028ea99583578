"""What made each image of a diffusion job, for the job page to show beside it: prompt, negative prompt,
seed, LoRAs and their weights, ControlNets with their weights and condition images, the inpainting mask,
the init frame of an img2img job, the strength, textual-inversion embeddings, the refiner and the upscaler.

Read from the image tasks' specs (the same records the worker was given, so the page says what was
really used), keyed by output name. Condition images are the job's own inputs: uploaded control images
and masks, or the source job's frames and render passes once they were released to this job. Invariants:

* :func:`condition_blobs` is the only list of blobs the page's thumbnail route may serve for a job:
  never a blob the job did not take as an input (a creator cannot read another's blob through it);
* one query (the job's diffusion tasks); nothing is computed for a job of another kind.
"""
from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from farm.store.models import Job, Task


def _image(spec: dict[str, Any], im: dict[str, Any]) -> dict[str, Any]:
    source = im.get("source") or {}
    names = spec.get("input_names") or {}
    controls = []
    passes = source.get("control_sha256") or []
    for i, c in enumerate(spec.get("controls") or []):
        sha = c.get("image_sha256") or (passes[i] if i < len(passes) else "")
        controls.append({"name": c.get("name", ""), "weight": c.get("weight", 1.0), "sha256": sha,
                         "pass": c.get("pass", ""),
                         "label": (im.get("control_names") or [""] * (i + 1))[i] if c.get("pass") else ""})
    mask = names.get("mask.png") or source.get("mask_sha256") or ""
    init = source.get("sha256") or names.get("init.png") or ""
    return {"index": im.get("index"), "seed": im.get("seed"), "prompt": im.get("prompt", ""),
            "negative": im.get("negative", ""),
            "loras": [{"name": lo.get("name", ""), "weight": lo.get("weight", 1.0)} for lo in spec.get("loras") or []],
            "controls": controls, "mask_sha256": mask, "init_sha256": init,
            "source": {"job": source["job"], "frame": source.get("frame")} if source.get("job") else None,
            "strength": spec.get("strength"), "mode": spec.get("mode", ""),
            "embeddings": [{"name": e.get("name", ""), "token": e.get("token", "")} for e in spec.get("embeddings") or []],
            "upscale": spec.get("upscale"), "refiner": spec.get("refiner")}


def image_conditions(session: Session, job: Job) -> dict[str, dict[str, Any]]:
    """Output name → the conditions of that image (empty for a job that is not a diffusion job)."""
    if job.kind != "diffusion":
        return {}
    out = {}
    for spec in session.exec(select(Task.spec).where(Task.job_id == job.id).where(Task.kind == "diffusion")
                             .where(Task.check_id.is_(None))):
        for im in spec.get("images") or []:
            if isinstance(im, dict) and im.get("name"):
                out[im["name"]] = _image(spec, im)
    return out


def condition_blobs(conditions: dict[str, dict[str, Any]]) -> set[str]:
    """Every blob a thumbnail of these conditions shows."""
    shas = set()
    for c in conditions.values():
        shas |= {x["sha256"] for x in c["controls"] if x["sha256"]} | {c["mask_sha256"], c["init_sha256"]}
    return shas - {""}
