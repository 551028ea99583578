"""Inpainting on the farm: a tiny inpainting pipeline (9-channel UNet, ``farm models tiny --inpaint``), the
image and mask uploaded as blobs and checked from their headers at submit, real sandboxed workers, and
images equal to diffusers' ``StableDiffusionInpaintPipeline`` called directly with the same inputs.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError
from tests.conftest import PY, REPO, pixels, wait_job, wait_workers
from tests.kinds.test_diffusion import SD_ENV, STEPS, outputs_by_name

PROMPT = "a red robot in a forest"


@pytest.fixture(scope="session")
def inpaint_model(tmp_path_factory) -> Path:
    from worker.runtimes.tiny_pipeline import build
    return build(tmp_path_factory.mktemp("inpaint-models") / "tiny-inpaint", inpaint=True)


def write_inputs(folder: Path, size: tuple[int, int] = (64, 48)) -> tuple[Path, Path]:
    """A noisy picture and a mask whose right half (white) is to be repainted."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / "picture.png")
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "picture.png", folder / "mask.png"


def direct(model: Path, image: Path, mask: Path, seed: int) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with Image.open(image) as im, Image.open(mask) as m:
        init, mk = im.convert("RGB"), m.convert("L")
    out = pipe(PROMPT, image=init, mask_image=mk, generator=torch.Generator("cpu").manual_seed(seed),
               num_inference_steps=STEPS, guidance_scale=7.5, strength=1.0, width=init.width,
               height=init.height).images[0]
    return np.asarray(out)


@pytest.mark.slow
def test_inpainting_from_uploaded_image_and_mask_equals_diffusers(farm, worker, inpaint_model, tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[inpaint_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    image, mask = write_inputs(tmp_path / "in")
    res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                          "--json", "--model", "tiny-inpaint", "--prompt", PROMPT, "--count", "2", "--seed", "11",
                          "--steps", str(STEPS), "--image", str(image), "--mask", str(mask), "--wait"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    job_id = int(res.stdout.strip().splitlines()[-1])
    job = alice.job(job_id)
    assert job["status"] == "rendered" and job["spec"]["mode"] == "inpaint"
    assert (job["spec"]["width"], job["spec"]["height"], job["spec"]["strength"]) == (64, 48, 1.0)  # the image's
    files = outputs_by_name(alice, job_id, tmp_path / "out")
    shas = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in (("init", image), ("mask", mask))}
    for k in range(2):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = json.loads(im.text["renderhive"])
            assert im.size == (64, 48)
        assert (meta["mode"], meta["source_mask_sha256"], meta["source_init_sha256"]) == \
               ("inpaint", shas["mask"], shas["init"])
        got = pixels(files[f"image_{k:04d}.png"])
        assert np.abs(got.astype(int) - direct(inpaint_model, image, mask, 11 + k).astype(int)).max() <= 1

    # refused at submit, nothing queued: inputs not uploaded, of another size, not a PNG
    other, small = write_inputs(tmp_path / "small", (32, 32))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"GIF89a" + bytes(200))
    up = {p: alice.upload_if_missing(p)[0] for p in (small, junk)}
    ok = dict(model="tiny-inpaint", prompts=[PROMPT], steps=STEPS, init_image=shas["init"], mask=shas["mask"])
    cases = [(dict(ok, mask="ab" * 32), 409, "is not uploaded: upload it first"),
             (dict(ok, mask=up[small]), 400, "the mask is 32x32 but the image is 64x48"),
             (dict(ok, mask=up[junk]), 400, "neither a PNG nor an OpenEXR"),
             (dict(ok, init_image=""), 400, "needs the image to paint into")]
    before = len(alice.jobs())
    for req, status, message in cases:
        with pytest.raises(ApiError, match=message) as err:
            alice.submit_diffusion(**req)
        assert err.value.status == status, (req, err.value)
    assert len(alice.jobs()) == before, "an invalid request queued a job"

    # an inpainting model without a mask fails at once, for good, saying what to give
    plain = alice.submit_diffusion(model="tiny-inpaint", prompts=[PROMPT], steps=STEPS, width=64, height=64)
    failed = wait_job(alice, plain["id"])
    assert failed["status"] == "failed" and "is an inpainting model" in failed["error"], failed


def test_an_inpainting_model_is_known_from_its_unet(inpaint_model):
    """What the worker's benchmark skips: a txt2img run of it fails (tested end to end above)."""
    from common import model_folders
    from worker.runtimes.tiny_pipeline import build
    assert model_folders.inpainting(inpaint_model)
    assert not model_folders.inpainting(build(inpaint_model.parent / "plain-sd"))
    assert model_folders.check(inpaint_model) == ""  # a complete pipeline folder like any other
