"""LoRAs on the farm: tiny random LoRA files (``farm models tiny-lora``) in a worker's ``loras/`` folder,
checked and hashed at worker start, pinned at submit, routed only to workers holding every piece, and
images equal to diffusers' own ``load_lora_weights`` + ``set_adapters`` on the same pipeline.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import model_folders
from common import protocol as P
from farm.kinds.jobs import JobError
from farm.store.models import Task
from tests.conftest import PY, REPO, pixels, wait_job, wait_workers
from tests.fixtures_inproc import Driver, make_engine_and_store, make_user, new_coordinator, of, rows
from tests.kinds.test_diffusion import RUNTIMES, SD_ENV, STEPS, _Payload, create, outputs_by_name, tiny_model  # noqa: F401

LORAS = {"ink": 1, "neon": 2}  # name → seed of its random weights
PROMPT = "a red robot in a forest"


@pytest.fixture(scope="session")
def lora_models(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    """A models folder holding tiny-sd and ``loras/ink.safetensors``, ``loras/neon.safetensors``."""
    from worker.runtimes.tiny_pipeline import build_lora
    root = tmp_path_factory.mktemp("lora-models")
    shutil.copytree(tiny_model, root / "tiny-sd")
    for name, seed in LORAS.items():
        build_lora(tiny_model, root / "loras" / f"{name}.safetensors", seed=seed)
    return root


def direct(model: Path, loras: list[tuple[Path, float]], seed: int, prompt: str = PROMPT) -> np.ndarray:
    """The image diffusers makes itself: a fresh pipeline, the LoRAs loaded and weighted, the same seed."""
    import torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _w) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
    if loras:
        pipe.set_adapters([f"a{i}" for i in range(len(loras))], [w for _p, w in loras])
    img = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
               guidance_scale=7.5, width=64, height=64).images[0]
    return np.asarray(img)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ------------------------------------------------------------------ files: checked and hashed at start
def test_lora_files_are_checked_and_hashed_and_pickles_never_load(lora_models, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(lora_models, root)
    marker = tmp_path / "payload-ran"
    (root / "loras" / "evil.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    ink = root / "loras" / "ink.safetensors"
    (root / "loras" / "cut.safetensors").write_bytes(ink.read_bytes()[:20_000])
    shutil.copy(root / "tiny-sd" / "vae" / "diffusion_pytorch_model.safetensors", root / "loras" / "vae.safetensors")
    scanned = model_folders.scan([root], tmp_path / "hashes.json", hub=False)
    assert scanned[0].kind == "pipeline", "the benchmark takes the first usable pipeline: LoRAs come after"
    found = {m.name: m for m in scanned}
    assert sorted(found) == ["cut", "evil", "ink", "neon", "tiny-sd", "vae"]  # loras/ is no model folder
    assert found["ink"].ok and found["ink"].kind == "lora" and found["tiny-sd"].kind == "pipeline"
    assert found["ink"].hash == hashlib.sha256(ink.read_bytes()).hexdigest()
    assert found["ink"].advert() == {"name": "ink", "hash": found["ink"].hash, "kind": "lora"}
    assert "pickled weights" in found["evil"].error and "safetensors" in found["evil"].error
    assert "truncated" in found["cut"].error
    assert "holds no LoRA tensors" in found["vae"].error
    assert not marker.exists(), "the pickle was loaded"
    monkeypatch.setattr(model_folders, "LORA_MAX_BYTES", 1000)
    assert "over the limit" in model_folders.check_lora(ink)


# ------------------------------------------------------------------ the runtime, in process
def test_runtime_stacks_loras_like_diffusers_and_never_leaks_them(lora_models, tmp_path):
    import diffusers
    import torch

    import worker.runtimes.diffusion as R
    from worker.runtimes import adapters
    R.torch, R.diffusers = torch, diffusers
    torch.set_num_threads(1)
    rt = R.Runtime(io.StringIO(), "none")
    model = lora_models / "tiny-sd"
    ink, neon = (lora_models / "loras" / f"{n}.safetensors" for n in ("ink", "neon"))
    ref = {n: {"name": n, "hash": model_folders.HashCache(None).file_sha256(p), "path": str(p)}
           for n, p in (("ink", ink), ("neon", neon))}
    base = {"model_path": str(model), "model_name": "tiny-sd", "model_hash": "m" * 64, "mode": "txt2img",
            "steps": STEPS, "guidance": 7.5, "width": 64, "height": 64, "scheduler": "default",
            "images": [{"name": "image_0000.png", "index": 0, "seed": 3, "prompt": PROMPT, "negative": ""}]}

    def run(tag: str, loras: list[dict]) -> np.ndarray:
        rt.generate(tag, {**base, "out_dir": str(tmp_path / tag), "loras": loras})
        return pixels(tmp_path / tag / "image_0000.png")

    plain = direct(model, [], 3)
    both = run("both", [{**ref["ink"], "weight": 0.8}, {**ref["neon"], "weight": 0.5}])
    assert worst(both, direct(model, [(ink, 0.8), (neon, 0.5)], 3)) <= 1
    assert worst(both, plain) > 16, "the LoRAs changed nothing"
    assert np.array_equal(run("none", []), plain), "a LoRA of an earlier request leaked into this one"
    assert worst(run("ink", [{**ref["ink"], "weight": 1.0}]), direct(model, [(ink, 1.0)], 3)) <= 1
    entry = rt.cache["m" * 64]
    assert list(entry["loras"]) == [ref["neon"]["hash"], ref["ink"]["hash"]]  # loaded once each, ink used last
    with Image.open(tmp_path / "both" / "image_0000.png") as im:
        meta = json.loads(im.text["renderhive"])
        assert json.loads(im.text["loras"]) == meta["loras"]
    assert meta["loras"] == [{"name": "ink", "hash": ref["ink"]["hash"], "weight": 0.8},
                             {"name": "neon", "hash": ref["neon"]["hash"], "weight": 0.5}]
    # a file changed under the worker (no longer a safetensors LoRA) is this worker's fault; a bad weight is the job's
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(R.WorkerFault, match="LoRA 'bad' cannot be used on this worker"):
        run("bad", [{"name": "bad", "hash": "b" * 64, "path": str(bad), "weight": 1.0}])
    with pytest.raises(R.RequestError, match="not a number"):
        run("nan", [{**ref["ink"], "weight": float("nan")}])
    assert adapters.adapter_name(ref["ink"]["hash"]) in entry["pipe"].get_list_adapters()["unet"]


# ------------------------------------------------------------------ submit and routing, in process
@pytest.fixture
def env(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    coord = new_coordinator(engine, blobs)
    return engine, blobs, user, coord, Driver(coord)


TINY = {"name": "tiny-sd", "hash": "ab" * 32}
INK = {"name": "ink", "hash": "c1" * 32, "kind": "lora"}
NEON = {"name": "neon", "hash": "d2" * 32, "kind": "lora"}


def test_lora_jobs_go_only_to_workers_holding_the_model_and_every_lora(env):
    engine, blobs, user, coord, d = env
    d.hello(b"only-ink", runtimes=RUNTIMES, models=[TINY, INK])
    d.hello(b"only-neon", runtimes=RUNTIMES, models=[TINY, NEON, {**INK, "hash": "", "error": "truncated"}])
    with pytest.raises(JobError, match="no single worker holds model 'tiny-sd' together with ink, neon"):
        create(engine, user, loras=[{"name": "ink", "weight": 0.8}, {"name": "neon", "weight": 0.5}])
    d.hello(b"both", runtimes=RUNTIMES, models=[TINY, INK, NEON])
    cases = [({"name": "grain"}, "no worker has LoRA 'grain'"),
             ({"name": "ink", "weight": 9}, "weight must be a number from -4 to 4"),
             ({"name": "ink", "hash": "ee" * 32}, "no worker holds this version of LoRA 'ink'"),
             ({"name": "tiny-sd"}, "no worker has LoRA 'tiny-sd'")]  # a model is not a LoRA
    for lora, message in cases:
        with pytest.raises(JobError, match=message):
            create(engine, user, loras=[lora])
    with pytest.raises(JobError, match="no worker has model 'ink'"):  # nor a LoRA a model
        create(engine, user, model="ink")
    with pytest.raises(JobError, match="named twice"):
        create(engine, user, loras=["ink", "ink"])
    job_id = create(engine, user, count=3, seed=5, loras=[{"name": "ink", "weight": 0.8}, {"name": "neon"}])
    tasks = rows(engine, Task, Task.job_id == job_id, order=Task.index)
    assert tasks[0].spec["loras"] == [{"name": "ink", "hash": INK["hash"], "weight": 0.8},
                                      {"name": "neon", "hash": NEON["hash"], "weight": 1.0}]
    assert tasks[0].spec["pieces"] == sorted([INK["hash"], NEON["hash"]])
    for w in (b"only-ink", b"only-neon"):
        assert not of(d.send((w, P.Ready(1))), P.Task), f"{w} lacks a LoRA and got a task"
    got = of(d.send((b"both", P.Ready(1))), P.Task, b"both")
    assert got and got[0].spec["pieces"] == tasks[0].spec["pieces"]
    plain = create(engine, user, count=1)  # without LoRAs any holder of the model fits
    assert "pieces" not in rows(engine, Task, Task.job_id == plain)[0].spec
    leased = d.send((b"only-ink", P.Ready(1)))  # both LoRA-less workers have a free slot now: either fits
    assert [w for w, m in leased if isinstance(m, P.Task)] in ([b"only-ink"], [b"only-neon"])


# ------------------------------------------------------------------ end to end, real processes
@pytest.mark.slow
def test_lora_job_runs_only_where_the_loras_are_and_equals_diffusers(farm, worker, lora_models, tiny_model,  # noqa: F811
                                                                     tmp_path):
    f = farm()
    worker(f, "w-loras", env=SD_ENV, models=[lora_models])
    worker(f, "w-plain", env=SD_ENV, models=[tiny_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 2)
    ink, neon = (lora_models / "loras" / f"{n}.safetensors" for n in ("ink", "neon"))
    job = alice.submit_diffusion(model="tiny-sd", prompts=[PROMPT], count=3, seed=40, steps=STEPS, width=64,
                                 height=64, loras=[{"name": "ink", "weight": 0.8}, {"name": "neon", "weight": 0.5}])
    done = wait_job(alice, job["id"], timeout=120)
    assert done["status"] == "rendered", done
    outs = alice.outputs(job["id"])
    assert {o["worker_id"] for o in outs if o["name"].startswith("image_")} == {"w-loras"}
    files = outputs_by_name(alice, job["id"], tmp_path / "api")
    hashes = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in (("ink", ink), ("neon", neon))}
    for k in range(3):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = json.loads(im.text["renderhive"])
        assert meta["loras"] == [{"name": "ink", "hash": hashes["ink"], "weight": 0.8},
                                 {"name": "neon", "hash": hashes["neon"], "weight": 0.5}]
        got = pixels(files[f"image_{k:04d}.png"])
        assert worst(got, direct(lora_models / "tiny-sd", [(ink, 0.8), (neon, 0.5)], 40 + k)) <= 1, f"image {k}"

    # the CLI: --lora NAME[:WEIGHT]
    res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                          "--json", "--model", "tiny-sd", "--prompt", PROMPT, "--size", "64x64", "--steps",
                          str(STEPS), "--seed", "9", "--lora", "neon:0.7", "--wait"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    job_id = int(res.stdout.strip().splitlines()[-1])
    assert alice.job(job_id)["spec"]["loras"] == [{"name": "neon", "hash": hashes["neon"], "weight": 0.7}]
    files = outputs_by_name(alice, job_id, tmp_path / "cli")
    assert worst(pixels(files["image_0000.png"]), direct(lora_models / "tiny-sd", [(neon, 0.7)], 9)) <= 1
