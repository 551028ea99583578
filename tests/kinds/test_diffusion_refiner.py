"""The SDXL refiner and SDXL textual inversion on the farm: a tiny refiner (``farm models tiny-refiner``: a ``StableDiffusionXLImg2ImgPipeline``
with only the second text encoder) in a worker's ``refiners/`` folder, checked and hashed at worker start, pinned
at submit, and images equal to diffusers' base + refiner recipe (``denoising_end`` / ``denoising_start``) called
directly with the same seed; an SDXL embedding (``clip_l`` and ``clip_g``) loaded into both text encoders equals
diffusers' ``load_textual_inversion`` into each, and is gone for the next job.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError
from common import model_folders
from tests.conftest import pixels, wait_job, wait_workers
from tests.kinds.test_diffusion import SD_ENV, STEPS, outputs_by_name
from tests.kinds.test_diffusion_from_job import job_page
from tests.kinds.test_diffusion_sdxl import xl_model  # noqa: F401  (fixture)

PROMPT = "a lighthouse at dusk in ink-style"  # ink-style: the SDXL embedding's token in one job, plain text in the next


@pytest.fixture(scope="session")
def refiner_models(xl_model, tmp_path_factory) -> Path:  # noqa: F811
    """tiny-xl, ``refiners/refiner`` and ``embeddings/xl-ink``."""
    from worker.runtimes.tiny_pipeline import build_embedding, build_refiner
    root = tmp_path_factory.mktemp("refiner-models")
    shutil.copytree(xl_model, root / "tiny-xl")
    build_refiner(root / "refiners" / "refiner")
    build_embedding(root / "embeddings" / "xl-ink.safetensors", seed=3, xl=True)
    return root


def direct_ti(models: Path, seed: int) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(models / "tiny-xl", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    emb = load_file(str(models / "embeddings" / "xl-ink.safetensors"))
    pipe.load_textual_inversion(emb["clip_l"], token="ink-style", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token="ink-style", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return np.asarray(pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                           guidance_scale=7.5, width=64, height=64).images[0])


def direct(models: Path, seed: int, switch: float) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    base = StableDiffusionXLPipeline.from_pretrained(models / "tiny-xl", local_files_only=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(models / "refiners" / "refiner", local_files_only=True)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    latents = base(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                   guidance_scale=7.5, width=64, height=64, denoising_end=switch, output_type="latent").images
    return np.asarray(refiner(PROMPT, image=latents, generator=torch.Generator("cpu").manual_seed(seed),
                              num_inference_steps=STEPS, guidance_scale=7.5, denoising_start=switch).images[0])


def test_a_refiner_folder_is_checked_and_is_no_model(refiner_models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(refiner_models, root)
    shutil.copytree(root / "tiny-xl", root / "refiners" / "a-base")
    found = {m.name: m for m in model_folders.scan([root], hub=False)}
    assert [n for n, m in found.items() if m.kind == "pipeline"] == ["tiny-xl"]
    assert found["refiner"].ok and found["refiner"].kind == "refiner"
    assert found["refiner"].hash == model_folders.folder_hash(root / "refiners" / "refiner")
    assert "not a refiner" in found["a-base"].error


@pytest.mark.slow
def test_refined_sdxl_images_equal_the_base_and_refiner_called_directly(farm, worker, refiner_models, tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[refiner_models])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    for req, message in ((dict(refiner={"name": "refiner", "switch": 1.5}), "refiner.switch: Input should be less than 1"),
                         (dict(refiner={"name": "nope"}), "no worker has refiner 'nope'"),
                         (dict(refiner={"name": "tiny-xl"}), "no worker has refiner 'tiny-xl'")):
        with pytest.raises(ApiError, match=message):
            alice.submit_diffusion(model="tiny-xl", prompts=[PROMPT], steps=STEPS, width=64, height=64, **req)
    ti = alice.submit_diffusion(model="tiny-xl", prompts=[PROMPT], seed=20, steps=STEPS, width=64, height=64,
                                embeddings=[{"name": "xl-ink", "token": "ink-style"}])
    assert wait_job(alice, ti["id"], timeout=120)["status"] == "rendered"
    got = pixels(outputs_by_name(alice, ti["id"], tmp_path / "ti")["image_0000.png"])
    assert np.abs(got.astype(int) - direct_ti(refiner_models, 20).astype(int)).max() <= 1
    # next, on the same runtime: the prompt's ink-style is plain text again (the refined images equal diffusers
    # without the embedding)
    job = alice.submit_diffusion(model="tiny-xl", prompts=[PROMPT], count=2, seed=12, steps=STEPS, width=64,
                                 height=64, refiner={"name": "refiner", "switch": 0.5})
    done = wait_job(alice, job["id"], timeout=120)
    assert done["status"] == "rendered", done
    files = outputs_by_name(alice, job["id"], tmp_path / "out")
    digest = model_folders.folder_hash(refiner_models / "refiners" / "refiner")
    for k in range(2):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = json.loads(im.text["renderhive"])
        assert meta["refiner"] == {"name": "refiner", "hash": digest, "switch": 0.5}
        got = pixels(files[f"image_{k:04d}.png"])
        assert np.abs(got.astype(int) - direct(refiner_models, 12 + k, 0.5).astype(int)).max() <= 1, f"image {k}"
    page = job_page(f.url, alice.token, job["id"])
    assert f"· refiner <code>refiner</code> from 0.5 ({digest[:12]})" in page
    assert '<dd class="refiner"><code>refiner</code> from 0.5</dd>' in page
