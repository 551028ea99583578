"""Diffusion over a render job's frames with its passes: inpainting where each frame's mask pass is white
(``--mask-from-job``), ControlNets together with img2img (``StableDiffusionControlNetImg2ImgPipeline``) and with
inpainting (``StableDiffusionControlNetInpaintPipeline``), each held until the render is approved and each
image equal to the diffusers pipeline called directly on the same frame, passes and seed.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError
from tests.conftest import PY, REPO, pixels, submit_sample, wait_job, wait_workers
from tests.kinds.test_diffusion import SD_ENV, STEPS, outputs_by_name
from tests.kinds.test_diffusion_controlnet import cn_models, tiny_model  # noqa: F401  (fixtures)

PROMPT = "an oil painting of a monkey"


@pytest.fixture(scope="session")
def job_models(cn_models, tmp_path_factory) -> Path:  # noqa: F811
    """tiny-sd, controlnets/depth and canny, and tiny-inpaint (a 9-channel UNet of the same blocks)."""
    from worker.runtimes.tiny_pipeline import build
    root = tmp_path_factory.mktemp("job-models")
    shutil.copytree(cn_models, root, dirs_exist_ok=True)
    build(root / "tiny-inpaint", inpaint=True)
    return root


def _rgb(path: Path, mode: str = "RGB") -> Image.Image:
    with Image.open(path) as im:
        return im.convert(mode)


def direct(models: Path, kind: str, frame: Path, seed: int, mask: Path | None = None, depth: Path | None = None,
           strength: float = 1.0) -> np.ndarray:
    """The diffusers pipeline of ``kind`` (inpaint, control_img2img, control_inpaint) called directly."""
    import torch
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionInpaintPipeline,
    )
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    extra, args = {}, {}
    if kind.startswith("control"):
        extra["controlnet"] = ControlNetModel.from_pretrained(models / "controlnets" / "depth", local_files_only=True)
        args.update(control_image=_rgb(depth), controlnet_conditioning_scale=0.8)
    cls = {"inpaint": StableDiffusionInpaintPipeline, "control_img2img": StableDiffusionControlNetImg2ImgPipeline,
           "control_inpaint": StableDiffusionControlNetInpaintPipeline}[kind]
    model = "tiny-sd" if kind == "control_img2img" else "tiny-inpaint"
    pipe = cls.from_pretrained(models / model, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    if mask is not None:
        args["mask_image"] = _rgb(mask, "L")
    image = _rgb(frame)
    out = pipe(PROMPT, image=image, strength=strength, generator=torch.Generator("cpu").manual_seed(seed),
               num_inference_steps=STEPS, guidance_scale=7.5, width=image.width // 8 * 8,
               height=image.height // 8 * 8, **args).images[0]
    return np.asarray(out)


@pytest.mark.slow
def test_mask_from_job_and_controlnets_with_img2img_and_inpainting_equal_diffusers(farm, worker, job_models,
                                                                                  tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[job_models])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    render = submit_sample(alice, "1-2", passes=["depth", "mask"])
    bare = submit_sample(alice, "1")
    with pytest.raises(ApiError, match=f"job {bare['id']} rendered no mask pass to inpaint with"):
        alice.submit_diffusion(model="tiny-inpaint", prompts=[PROMPT], mask_from_job=bare["id"])
    refusals = [(dict(mask_from_job=render["id"], init_from_job=render["id"]), "leave out --init-from-job"),
                (dict(mask_from_job=render["id"], mask="ab" * 32), "not both"),
                (dict(init_from_job=render["id"], control_from_job=bare["id"], controls=[{"name": "depth"}]),
                 "must come from the same render job")]
    for req, message in refusals:
        with pytest.raises(ApiError, match=message):
            alice.submit_diffusion(model="tiny-inpaint", prompts=[PROMPT], **req)

    res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                          "--json", "--model", "tiny-inpaint", "--prompt", PROMPT, "--seed", "80", "--steps",
                          str(STEPS), "--mask-from-job", str(render["id"])],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    inpaint = alice.job(int(res.stdout.strip().splitlines()[-1]))
    assert inpaint["spec"]["mode"] == "inpaint" and inpaint["spec"]["strength"] == 1.0
    depth = [{"name": "depth", "weight": 0.8}]
    img2img = alice.submit_diffusion(model="tiny-sd", prompts=[PROMPT], seed=90, steps=STEPS, strength=0.6,
                                     init_from_job=render["id"], control_from_job=render["id"], controls=depth)
    both = alice.submit_diffusion(model="tiny-inpaint", prompts=[PROMPT], seed=100, steps=STEPS,
                                  mask_from_job=render["id"], control_from_job=render["id"], controls=depth)
    for job in (inpaint, img2img, both):
        assert alice.job(job["id"])["tasks"].get("waiting") == 3, job  # two images and the sheet wait
    assert wait_job(alice, render["id"])["status"] == "rendered"
    alice.approve(render["id"])
    for job in (inpaint, img2img, both):
        assert wait_job(alice, job["id"], timeout=180)["status"] == "rendered", alice.job(job["id"])
    passes = outputs_by_name(alice, render["id"], tmp_path / "render")
    for job, kind, seed, strength in ((inpaint, "inpaint", 80, 1.0), (img2img, "control_img2img", 90, 0.6),
                                      (both, "control_inpaint", 100, 1.0)):
        files = outputs_by_name(alice, job["id"], tmp_path / kind)
        for i, fr in enumerate((1, 2)):
            name = f"image_{i:04d}_frame_{fr:04d}.png"
            frame, mask, dep = (passes[f"{p}_{fr:04d}.png"] for p in ("frame", "mask", "depth"))
            with Image.open(files[name]) as im:
                meta = json.loads(im.text["renderhive"])
                assert im.size == (64, 48)  # the frames' size
            assert (meta["source_job"], meta["source_frame"], meta["strength"]) == (render["id"], fr, strength)
            assert meta["source_sha256"] == hashlib.sha256(frame.read_bytes()).hexdigest()
            if kind != "control_img2img":
                assert meta["source_mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
            if kind != "inpaint":
                assert [c["pass"] for c in meta["controls"]] == ["depth"]
            want = direct(job_models, kind, frame, seed + i, mask=None if kind == "control_img2img" else mask,
                          depth=dep, strength=strength)
            assert np.abs(pixels(files[name]).astype(int) - want.astype(int)).max() <= 1, (kind, name)
    page = job_page(f.url, alice.token, inpaint["id"])  # the page of a job inpainting a render's frames
    assert f"inpainting the frames of job {render['id']} where their mask pass is white, strength 1.0" in page
    page = job_page(f.url, alice.token, both["id"])  # ControlNets over render passes: no uploaded image
    assert "<code>depth</code> × 0.8 (" in page and ", render pass depth)" in page and 'class="mask"' in page


def job_page(url: str, token: str, job_id: int) -> str:
    """The job page as the creator sees it (logged in through the form)."""
    import httpx
    with httpx.Client(base_url=url, timeout=30) as http:
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text).group(1)
        http.post("/login", data={"csrf": csrf, "token": token})
        res = http.get(f"/jobs/{job_id}")
    assert res.status_code == 200, res.text[-2000:]
    return " ".join(res.text.split())


def test_uploaded_controls_with_an_uploaded_image_and_mask_are_all_the_tasks_inputs(tmp_path):
    """ControlNet inpainting from uploads, in process: each task takes the image, the mask and every control
    image (and names them for the worker), the job pins the ControlNet with the model."""
    import io

    from farm.kinds import diffusion
    from farm.store.db import session
    from farm.store.models import Task
    from tests.fixtures_inproc import Driver, make_engine_and_store, make_user, new_coordinator, rows
    from tests.kinds.test_diffusion import RUNTIMES

    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    Driver(new_coordinator(engine, blobs)).hello(b"w", runtimes=RUNTIMES, models=[
        {"name": "tiny-inpaint", "hash": "ab" * 32}, {"name": "depth", "hash": "cd" * 32, "kind": "controlnet"}])

    def upload(color, mode="RGB") -> str:
        buf = io.BytesIO()
        Image.new(mode, (64, 48), color).save(buf, "PNG")
        return blobs.write_bytes(buf.getvalue())
    image, mask, control = upload((200, 10, 10)), upload(255, "L"), upload((0, 0, 255))
    with session(engine) as s:
        job = diffusion.create_diffusion_job(s, user, {
            "model": "tiny-inpaint", "prompts": [PROMPT], "count": 2, "steps": 4, "per_task": 2, "init_image": image,
            "mask": mask, "controls": [{"name": "depth", "weight": 0.5, "image": control}]}, blobs)
        s.commit()
        job_id = job.id
    [task] = [t for t in rows(engine, Task, Task.job_id == job_id) if t.kind == "diffusion"]
    assert task.spec["mode"] == "inpaint" and (task.spec["width"], task.spec["height"]) == (64, 48)
    assert task.spec["input_names"] == {"control_0.png": control, "init.png": image, "mask.png": mask}
    assert sorted(task.inputs) == sorted([control, image, mask])
    assert task.spec["controls"] == [{"name": "depth", "hash": "cd" * 32, "weight": 0.5, "image_sha256": control}]
    assert task.spec["pieces"] == ["cd" * 32]
