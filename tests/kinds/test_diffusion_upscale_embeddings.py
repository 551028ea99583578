"""Upscaling and textual inversion on the farm: a tiny x4 upscaler (``farm models tiny-upscaler``) in a worker's
``upscalers/`` folder and random embeddings (``farm models tiny-embedding``) in its ``embeddings/`` folder,
checked and hashed at worker start, pinned at submit, routed only to workers holding them, and images equal
to diffusers' ``StableDiffusionUpscalePipeline`` on the same base image and ``load_textual_inversion`` called
directly; one job's embedding tokens never reach the next job's prompts.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import model_folders
from common import protocol as P
from farm.kinds.jobs import JobError
from farm.store.models import Task
from tests.conftest import PY, REPO, pixels, wait_workers
from tests.fixtures_inproc import of, rows
from tests.kinds.test_diffusion import RUNTIMES, SD_ENV, STEPS, _Payload, create, outputs_by_name, tiny_model  # noqa: F401
from tests.kinds.test_diffusion_from_job import job_page
from tests.kinds.test_diffusion_lora import env  # noqa: F401  (fixture: an in-process farm)

PROMPT = "a painting of a cat in ink-style"
EMBEDDINGS = {"ink": 1, "grain": 2}  # name → seed of its random vectors
UP_STEPS = 2


@pytest.fixture(scope="session")
def post_models(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    """A models folder holding tiny-sd, ``upscalers/x4`` and ``embeddings/ink``, ``embeddings/grain``."""
    from worker.runtimes.tiny_pipeline import build_embedding, build_upscaler
    root = tmp_path_factory.mktemp("post-models")
    shutil.copytree(tiny_model, root / "tiny-sd")
    build_upscaler(root / "upscalers" / "x4")
    for name, seed in EMBEDDINGS.items():
        build_embedding(root / "embeddings" / f"{name}.safetensors", seed=seed)
    return root


def _pipe(models: Path):
    import torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    pipe = StableDiffusionPipeline.from_pretrained(models / "tiny-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct(models: Path, prompt: str, seed: int, embeddings: list[tuple[str, str]] = (),
           upscale: tuple[int, int] | None = None) -> np.ndarray:
    """diffusers called directly: a fresh pipeline, each embedding loaded under its token, the same seed; with
    ``upscale`` (steps, noise level) the base image upscaled by the x4 pipeline with the same seed."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    pipe = _pipe(models)
    for name, token in embeddings:
        pipe.load_textual_inversion(str(models / "embeddings" / f"{name}.safetensors"), token=token)
    img = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
               guidance_scale=7.5, width=64, height=64).images[0]
    if upscale:
        up = StableDiffusionUpscalePipeline.from_pretrained(models / "upscalers" / "x4", local_files_only=True)
        up.set_progress_bar_config(disable=True)
        img = up(prompt=prompt, image=img, num_inference_steps=upscale[0], guidance_scale=7.5,
                 noise_level=upscale[1], generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(img)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ------------------------------------------------------------------ file checks
def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A safetensors file with these (dtype, shape) tensors of zeros, written by hand (any header we like)."""
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * 4
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def test_upscaler_folders_and_embedding_files_are_checked_and_hashed(post_models, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(post_models, root)
    emb, ups = root / "embeddings", root / "upscalers"
    marker = tmp_path / "payload-ran"
    (emb / "pickled.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    (emb / "garbage.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    _safetensors(emb / "cube.safetensors", {"emb_params": ("F32", [2, 4, 32])})
    _safetensors(emb / "many.safetensors", {f"t{i}": ("F32", [32]) for i in range(3)})
    _safetensors(emb / "tall.safetensors", {"emb_params": ("F32", [76, 32])})
    _safetensors(emb / "ints.safetensors", {"emb_params": ("I64", [1, 32])})
    shutil.copytree(ups / "x4", ups / "pickled")
    (ups / "pickled" / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    shutil.copytree(root / "tiny-sd", ups / "not-an-upscaler")
    found = {m.name: m for m in model_folders.scan([root], tmp_path / "hashes.json", hub=False)}
    assert sorted(m for m in found if found[m].kind == "pipeline") == ["tiny-sd"]  # upscalers/ and embeddings/ are no models
    assert found["x4"].ok and found["x4"].kind == "upscaler"
    assert found["x4"].hash == model_folders.folder_hash(ups / "x4")
    assert found["ink"].ok and found["ink"].kind == "embedding"
    assert found["ink"].hash == hashlib.sha256((emb / "ink.safetensors").read_bytes()).hexdigest()
    assert found["x4"].advert() == {"name": "x4", "hash": found["x4"].hash, "kind": "upscaler"}
    errors = {n: found[n].error for n in ("pickled", "garbage", "cube", "many", "tall", "ints", "not-an-upscaler")}
    assert "holds pickled weights, which can run code" in errors["pickled"] and not marker.exists(), errors
    assert "corrupt header" in errors["garbage"], errors
    assert "is no embedding" in errors["cube"] and "is no embedding" in errors["tall"] and "is no embedding" in errors["ints"]
    assert "holds 3 tensors" in errors["many"]
    assert "not an upscaler" in errors["not-an-upscaler"]
    pickled_up = [m for m in found.values() if m.kind == "upscaler" and m.name == "pickled"]
    assert pickled_up and "pickled weights" in pickled_up[0].error  # same name as the pickled embedding: both refused
    monkeypatch.setattr(model_folders, "EMBEDDING_MAX_BYTES", 100)
    assert "over the limit" in model_folders.check_embedding(emb / "ink.safetensors")


# ------------------------------------------------------------------ submit and routing, in process
TINY = {"name": "tiny-sd", "hash": "ab" * 32}
X4 = {"name": "x4", "hash": "c1" * 32, "kind": "upscaler"}
INK = {"name": "ink", "hash": "d2" * 32, "kind": "embedding"}


def test_upscale_and_embedding_jobs_are_pinned_and_go_only_where_they_are(env):  # noqa: F811
    engine, blobs, user, coord, d = env
    d.hello(b"plain", runtimes=RUNTIMES, models=[TINY])
    d.hello(b"only-x4", runtimes=RUNTIMES, models=[TINY, X4])
    d.hello(b"only-ink", runtimes=RUNTIMES, models=[TINY, INK])
    with pytest.raises(JobError, match="no single worker holds model 'tiny-sd' together with ink, x4"):
        create(engine, user, embeddings=[{"name": "ink"}], upscale="x4")
    d.hello(b"all", runtimes=RUNTIMES, models=[TINY, X4, INK])
    cases = [(dict(upscale="x8"), "no worker has upscaler 'x8'"),
             (dict(upscale="ink"), "no worker has upscaler 'ink'"),  # an embedding is no upscaler
             (dict(embeddings=["toy"]), "no worker has embedding 'toy'"),
             (dict(embeddings=[{"name": "ink", "token": "two words"}]), "must be one word"),
             (dict(embeddings=["ink", {"name": "ink"}]), "token 'ink' is given twice"),
             (dict(upscale={"name": "x4", "noise_level": 999}), "noise_level must be a whole number from 0 to 350"),
             (dict(upscale="x4", width=1536, height=1536), "upscaled x4 is over 4096 pixels")]
    for req, message in cases:
        with pytest.raises(JobError, match=message):
            create(engine, user, **req)
    job_id = create(engine, user, count=2, embeddings=[{"name": "ink", "token": "<ink>"}],
                    upscale={"name": "x4", "steps": 3})
    [task, _sheet] = rows(engine, Task, Task.job_id == job_id, order=Task.index)[:2]
    assert task.spec["embeddings"] == [{"name": "ink", "token": "<ink>", "hash": INK["hash"]}]
    assert task.spec["upscale"] == {"name": "x4", "steps": 3, "noise_level": 20, "hash": X4["hash"], "scale": 4}
    assert task.spec["pieces"] == sorted([X4["hash"], INK["hash"]])
    for w in (b"plain", b"only-x4", b"only-ink"):
        assert not of(d.send((w, P.Ready(1))), P.Task), f"{w} lacks a piece and got a task"
    got = of(d.send((b"all", P.Ready(1))), P.Task, b"all")
    assert got and got[0].spec["pieces"] == task.spec["pieces"]


# ------------------------------------------------------------------ end to end, real processes
@pytest.mark.slow
def test_upscaled_and_embedding_images_equal_diffusers_and_tokens_never_leak(farm, worker, post_models, tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[post_models])  # one slot: every job below runs in the same runtime child
    alice = f.creator("alice")
    wait_workers(alice, 1)

    def submit(*args: str) -> dict:
        res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                              "--json", "--model", "tiny-sd", "--prompt", PROMPT, "--size", "64x64", "--steps",
                              str(STEPS), *args, "--wait"], capture_output=True, text=True, cwd=REPO, timeout=180)
        assert res.returncode == 0, res.stderr
        job = alice.job(int(res.stdout.strip().splitlines()[-1]))
        assert job["status"] == "rendered", job
        return job

    ti = submit("--count", "2", "--seed", "50", "--embedding", "ink:ink-style", "--embedding", "grain")
    plain = submit("--seed", "50")  # the same prompt, its word ink-style now plain text again
    up = submit("--seed", "60", "--upscale", "x4", "--upscale-steps", str(UP_STEPS), "--upscale-noise", "30")
    sha = {n: hashlib.sha256((post_models / "embeddings" / f"{n}.safetensors").read_bytes()).hexdigest()
           for n in EMBEDDINGS}
    files = outputs_by_name(alice, ti["id"], tmp_path / "ti")
    for k in range(2):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = json.loads(im.text["renderhive"])
        assert meta["embeddings"] == [{"name": "ink", "hash": sha["ink"], "token": "ink-style"},
                                      {"name": "grain", "hash": sha["grain"], "token": "grain"}]
        want = direct(post_models, PROMPT, 50 + k, [("ink", "ink-style"), ("grain", "grain")])
        assert worst(pixels(files[f"image_{k:04d}.png"]), want) <= 1, f"image {k}"
    got = pixels(outputs_by_name(alice, plain["id"], tmp_path / "plain")["image_0000.png"])
    assert worst(got, direct(post_models, PROMPT, 50)) <= 1, "an earlier job's embedding leaked into this one"
    assert worst(got, pixels(files["image_0000.png"])) > 1, "the embedding changed nothing"

    files = outputs_by_name(alice, up["id"], tmp_path / "up")
    with Image.open(files["image_0000.png"]) as im:
        meta = json.loads(im.text["renderhive"])
        assert im.size == (256, 256)
    x4 = model_folders.folder_hash(post_models / "upscalers" / "x4")
    assert (meta["upscaler"], meta["upscaler_hash"], meta["upscale"]) == \
        ("x4", x4, {"name": "x4", "hash": x4, "steps": UP_STEPS, "noise_level": 30, "scale": 4})
    want = direct(post_models, PROMPT, 60, upscale=(UP_STEPS, 30))
    assert worst(pixels(files["image_0000.png"]), want) <= 1
    page = job_page(f.url, alice.token, ti["id"])
    assert f"· embedding <code>ink</code> as ink-style ({sha['ink'][:12]})," in page, page
    assert '<dd class="embedding"><code>grain</code> as grain</dd>' in page
    page = job_page(f.url, alice.token, up["id"])
    assert f"· upscaled × 4 by <code>x4</code> ({x4[:12]})" in page and '<dd class="upscale">× 4 by <code>x4</code></dd>' in page


def test_a_refused_or_half_failed_embedding_load_leaves_the_pipeline_as_it_was(post_models, tmp_path):
    """The runtime's side, in process: a token the model already has is the job's fault; an embedding of
    another text width fails after the first one loaded, and both are gone afterwards."""
    from worker.runtimes.adapters import AdapterError, load_embeddings, unload_embeddings
    from worker.runtimes.tiny_pipeline import build_embedding
    pipe = _pipe(post_models)
    entry = {"pipe": pipe, "name": "tiny-sd", "family": "sd"}
    before = (len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.clone())
    ink = {"name": "ink", "hash": "x", "token": "ink-style", "path": str(post_models / "embeddings" / "ink.safetensors")}
    wide = {"name": "wide", "hash": "y", "token": "wide-style",
            "path": str(build_embedding(tmp_path / "embeddings" / "wide.safetensors", width=64))}
    with pytest.raises(AdapterError, match="already a word of model 'tiny-sd'") as err:
        load_embeddings(entry, [{**ink, "token": "<|endoftext|>"}])
    assert not err.value.retryable
    with pytest.raises(AdapterError, match="does not fit model 'tiny-sd'"):
        load_embeddings(entry, [ink, wide])
    state = load_embeddings(entry, [ink])
    assert pipe.maybe_convert_prompt("a ink-style cat", pipe.tokenizer) == "a ink-style ink-style_1 cat"
    assert unload_embeddings(entry, state)
    after = pipe.text_encoder.get_input_embeddings().weight
    assert len(pipe.tokenizer) == before[0] and after.shape == before[1].shape and bool((after == before[1]).all())
    assert pipe.maybe_convert_prompt("a ink-style cat", pipe.tokenizer) == "a ink-style cat"

