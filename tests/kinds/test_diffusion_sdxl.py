"""Stable Diffusion XL on the farm: a tiny SDXL pipeline (two text encoders, ``farm models tiny --xl``) through
a real sandboxed worker, each image equal to diffusers' ``StableDiffusionXLPipeline`` called directly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import model_folders
from tests.conftest import pixels, wait_job, wait_workers
from tests.kinds.test_diffusion import SD_ENV, STEPS, outputs_by_name

PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="session")
def xl_model(tmp_path_factory) -> Path:
    from worker.runtimes.tiny_pipeline import build_xl
    return build_xl(tmp_path_factory.mktemp("xl-models") / "tiny-xl")


def direct(model: Path, seed: int) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionXLPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                           guidance_scale=7.5, width=64, height=64).images[0])


def test_an_sdxl_folder_is_a_complete_pipeline_of_the_xl_family(xl_model, tmp_path):
    from worker.runtimes.tiny_pipeline import build
    assert model_folders.check(xl_model) == "" and model_folders.family(xl_model) == "sdxl"
    assert model_folders.family(build(tmp_path / "tiny-sd")) == "sd"


@pytest.mark.slow
def test_sdxl_images_through_a_worker_equal_the_xl_pipeline(farm, worker, xl_model, tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[xl_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = alice.submit_diffusion(model="tiny-xl", prompts=[PROMPT], count=2, seed=8, steps=STEPS, width=64, height=64)
    done = wait_job(alice, job["id"], timeout=120)
    assert done["status"] == "rendered", done
    files = outputs_by_name(alice, job["id"], tmp_path / "out")
    for k in range(2):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = json.loads(im.text["renderhive"])
        assert (meta["model"], meta["scheduler"], meta["seed"]) == ("tiny-xl", "EulerDiscreteScheduler", 8 + k)
        got = pixels(files[f"image_{k:04d}.png"])
        assert np.abs(got.astype(int) - direct(xl_model, 8 + k).astype(int)).max() <= 1, f"image {k}"
