"""Stable Diffusion on the farm: a real tiny diffusers pipeline (``farm models tiny``), real `farm serve` and
`farm worker` processes, and images compared pixel for pixel with the pipeline called directly.

Also, in process: the scheduler sends diffusion tasks only to workers holding the model (preferring the
one that has it loaded), and an img2img job waits for its source job and takes its frames.
"""
from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError
from common import protocol as P
from farm.kinds import diffusion
from farm.kinds.jobs import JobError
from farm.store.models import Job, Task
from farm.web import review
from tests.conftest import PY, REPO, pixels, submit_sample, wait_for, wait_job, wait_workers
from tests.fixtures_inproc import (
    Driver,
    get,
    make_engine_and_store,
    make_job,
    make_user,
    new_coordinator,
    of,
    output_blob,
    rows,
)

STEPS, SIZE = 4, 64
# One torch thread in the workers' runtimes and in this process: the thread count changes float rounding
# (so bit-exactness needs the same on both sides), and on a shared 2-core machine two OpenMP threads stall
# each other whenever other load takes a core.
SD_ENV = {"RENDERHIVE_DIFFUSION_THREADS": "1"}
RUNTIMES = ["blender", "contact_sheet", "diffusion"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny pipeline, built once, as ``models/tiny-sd`` (workers get ``--models models``)."""
    from worker.runtimes.tiny_pipeline import build
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def pipe(tiny_model):
    """The same model loaded in this process, exactly as a user would load it."""
    import torch  # the test process may import torch; the worker daemon may not
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    p = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def direct(pipe, prompt: str, seed: int, steps: int = STEPS, size: int = SIZE) -> np.ndarray:
    import torch
    img = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps,
               guidance_scale=7.5, width=size, height=size).images[0]
    return np.asarray(img)


def outputs_by_name(client, job_id: int, out: Path) -> dict[str, Path]:
    client.approve(job_id)  # full-resolution files are released on approval
    return {p.name: p for p in client.download_results(job_id, out)}


# ------------------------------------------------------------------ end to end, real processes
@pytest.mark.slow
def test_eight_images_on_two_workers_equal_the_direct_pipeline(farm, worker, tiny_model, pipe, tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[tiny_model.parent])
    worker(f, "w2", env=SD_ENV, models=[tiny_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 2)
    prompts = ["a watercolor painting of a lighthouse at dusk", "a red robot in a forest"]
    job = alice.submit_diffusion(model="tiny-sd", prompts=prompts, count=4, seed=1234, steps=STEPS,
                                 width=SIZE, height=SIZE, per_task=1)
    assert job["spec"]["images_total"] == 8 and job["tasks"]["total"] == 9  # 8 images + the contact sheet
    done = wait_job(alice, job["id"], timeout=120)
    assert done["status"] == "rendered", done
    outs = alice.outputs(job["id"])
    assert {o["worker_id"] for o in outs if o["name"].startswith("image_")} == {"w1", "w2"}
    files = outputs_by_name(alice, job["id"], tmp_path / "single")
    assert sorted(files) == ["contact_sheet.png"] + [f"image_{k:04d}.png" for k in range(8)]
    model_hash = done["spec"]["model_hash"]
    for k in range(8):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = dict(im.text)
        assert (meta["prompt"], int(meta["seed"]), int(meta["steps"]), float(meta["guidance"])) == \
               (prompts[k // 4], 1234 + k, STEPS, 7.5)
        assert (meta["model"], meta["model_hash"], meta["scheduler"], meta["negative_prompt"]) == \
               ("tiny-sd", model_hash, "PNDMScheduler", "")
        got = pixels(files[f"image_{k:04d}.png"])
        assert np.array_equal(got, direct(pipe, prompts[k // 4], 1234 + k)), f"image {k} differs from the pipeline"
    with Image.open(files["contact_sheet.png"]) as sheet:
        assert sheet.size == (3 * 96, 3 * (96 + 14))  # 3x3 grid of cells (64 px images, labels 96 px wide)

    # the same batch in micro-batches of 4: the same seeds, pixels within 1/255 of the single runs
    batched = alice.submit_diffusion(model="tiny-sd", prompts=prompts, count=4, seed=1234, steps=STEPS,
                                     width=SIZE, height=SIZE, per_task=4)
    assert batched["tasks"]["total"] == 3
    assert wait_job(alice, batched["id"], timeout=120)["status"] == "rendered"
    files4 = outputs_by_name(alice, batched["id"], tmp_path / "batched")
    worst = max(np.abs(pixels(files4[n]).astype(int) - pixels(files[n]).astype(int)).max()
                for n in files if n.startswith("image_"))
    print(f"micro-batch 4 vs 1: max difference {worst}/255")
    assert worst <= 1


@pytest.mark.slow
def test_img2img_waits_for_a_render_job_and_keeps_each_frame_traceable(farm, worker, tiny_model, pipe, tmp_path):
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[tiny_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    render = submit_sample(alice, "1-4")
    sd = alice.submit_diffusion(model="tiny-sd", prompts=["an oil painting"], init_from_job=render["id"],
                                strength=0.75, seed=7, steps=STEPS)
    assert sd["status"] == "funding" and sd["tasks"].get("waiting") == 5, sd["tasks"]  # held until the frames exist
    assert wait_job(alice, render["id"])["status"] == "rendered"
    time.sleep(1.5)  # a few sweeps: rendered is not enough, the frames are not paid for
    assert alice.job(sd["id"])["tasks"].get("waiting") == 5, "img2img started from frames nobody approved"
    alice.approve(render["id"])
    done = wait_job(alice, sd["id"], timeout=120)
    assert done["status"] == "rendered", done
    outs = [o for o in alice.outputs(sd["id"]) if o["name"] != "contact_sheet.png"]
    assert [(o["name"], o["frame"]) for o in outs] == \
        [(f"image_{i:04d}_frame_{i + 1:04d}.png", i + 1) for i in range(4)]
    assert all("sha256" not in o for o in outs), "no content hash before the job is approved"
    files = outputs_by_name(alice, sd["id"], tmp_path / "sd")
    src_files = outputs_by_name(alice, render["id"], tmp_path / "frames")
    frames = {o["name"]: o for o in alice.outputs(render["id"])}  # approved: hashes released
    outs = [o for o in alice.outputs(sd["id"]) if o["name"] != "contact_sheet.png"]
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    for i, o in enumerate(outs):
        with Image.open(files[o["name"]]) as im:
            meta = dict(im.text)
            assert im.size == (64, 48)  # the source frames' size (TEST_SETTINGS), already a multiple of 8
        frame_name = f"frame_{i + 1:04d}.png"
        assert (int(meta["source_job"]), int(meta["source_frame"]), meta["source_name"], meta["source_sha256"]) == \
               (render["id"], i + 1, frame_name, frames[frame_name]["sha256"])
        assert (int(meta["seed"]), meta["mode"], float(meta["strength"])) == (7 + i, "img2img", 0.75)
        with Image.open(src_files[frame_name]) as src:
            want = i2i("an oil painting", image=src.convert("RGB"), strength=0.75, num_inference_steps=STEPS,
                       guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(7 + i)).images[0]
        assert np.array_equal(pixels(files[o["name"]]), np.asarray(want)), f"image {i} differs from the pipeline"
    # the source frames are distinct, and so are the stylised images
    assert len({o["sha256"] for o in outs}) == 4


@pytest.mark.slow
def test_worker_killed_mid_batch_the_rest_is_made_elsewhere_none_twice(farm, worker, tiny_model, pipe, tmp_path):
    f = farm()
    w1 = worker(f, "w1", env=SD_ENV, models=[tiny_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = alice.submit_diffusion(model="tiny-sd", prompts=["a castle on a hill"], count=12, seed=50, steps=30,
                                 width=SIZE, height=SIZE)

    def mid_batch():
        view = alice.job(job["id"])
        running = any(t["status"] == "running" and t["worker_id"] == "w1" for t in view["task_list"])
        return running and view["tasks"].get("accepted", 0) >= 2
    wait_for(mid_batch, 120, interval=0.02, what="w1 half way through the batch")
    w1.kill()  # kill -9 the daemon and its diffusion child mid-image
    time.sleep(1)  # a RESULT w1 sent just before it died is still accepted: let it land
    made_by_w1 = {o["name"] for o in alice.outputs(job["id"])}
    assert len(made_by_w1) >= 2
    worker(f, "w2", env=SD_ENV, models=[tiny_model.parent])
    done = wait_job(alice, job["id"], timeout=180)
    assert done["status"] == "rendered", done
    outs = alice.outputs(job["id"])
    names = [o["name"] for o in outs]
    assert sorted(names) == ["contact_sheet.png"] + [f"image_{k:04d}.png" for k in range(12)]
    assert {o["name"] for o in outs if o["worker_id"] == "w1"} == made_by_w1  # kept, not made again
    assert {o["worker_id"] for o in outs if o["name"] not in made_by_w1} == {"w2"}
    workers = {w["id"]: w for w in alice.workers()}
    assert workers["w1"]["tasks_done"] + workers["w2"]["tasks_done"] == 13, "an image was generated twice"
    detail = alice.job(job["id"])
    released = [t for t in detail["task_list"] if t["attempt"] >= 2]
    assert released and any("lease lost" in e["detail"] for e in detail["events"])
    files = outputs_by_name(alice, job["id"], tmp_path / "out")
    for t in released:  # the image made again elsewhere is the one the seed gives
        k = t["index"]
        assert np.array_equal(pixels(files[f"image_{k:04d}.png"]), direct(pipe, "a castle on a hill", 50 + k, 30))


@pytest.mark.slow
def test_invalid_requests_are_refused_at_submit_with_nothing_queued(farm, worker, tiny_model, tmp_path):
    import shutil
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "tiny-sd")
    shutil.copytree(tiny_model, models / "tiny-copy")  # a copy the coordinator has no tokenizer for
    broken = models / "broken-sd"
    shutil.copytree(tiny_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])  # a truncated download
    f = farm(env={"RENDERHIVE_MODELS": str(tiny_model.parent)})  # the coordinator can count tokens of tiny-sd
    worker(f, "w1", env=SD_ENV, models=[models])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    ok = dict(model="tiny-sd", prompts=["a cat"], steps=STEPS, width=SIZE, height=SIZE)
    cases = [
        (dict(ok, model="sd-nonexistent"), "no worker has model 'sd-nonexistent'"),
        (dict(ok, model="broken-sd"), "unet/diffusion_pytorch_model.safetensors is truncated"),
        (dict(ok, prompts=["a cat " * 60]), "over the limit of 77 tokens"),
        (dict(ok, width=100), "multiples of 8"),
        (dict(ok, count=0), "count must be a whole number from 1 to 4096"),
        (dict(ok, count=10_000), "count must be a whole number from 1 to 4096"),
        (dict(ok, scheduler="warp-drive"), "unknown scheduler"),
        (dict(ok, init_from_job=999), "job 999 not found"),
    ]
    for req, message in cases:
        with pytest.raises(ApiError, match=message) as err:
            alice.submit_diffusion(**req)
        assert err.value.status in (400, 404), (req, err.value)
    assert alice.jobs() == [], "an invalid request queued a job"

    # the CLI refuses a corrupt local model folder before sending anything
    res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                          "--model", str(broken), "--prompt", "a cat"], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    assert res.returncode == 2 and "is truncated" in res.stderr and "farm models tiny" in res.stderr, res.stderr
    # a local folder pins its hash: the job runs on exactly those weights
    res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                          "--json", "--model", str(models / "tiny-copy"), "--prompt", "a cat", "--size", "64x64",
                          "--steps", "2", "--wait"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    job_id = int(res.stdout.strip().splitlines()[-1])
    assert alice.job(job_id)["status"] == "rendered"

    # where the coordinator has no tokenizer for the model, the worker refuses the prompt for good
    long = alice.submit_diffusion(**dict(ok, model="tiny-copy", prompts=["a cat " * 60]))
    failed = wait_job(alice, long["id"])
    assert failed["status"] == "failed" and "over the model's limit of 77" in failed["error"], failed


# ------------------------------------------------------------------ in process: scheduling and chaining
TINY = {"name": "tiny-sd", "hash": "ab" * 32}


@pytest.fixture
def env(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    coord = new_coordinator(engine, blobs)
    return engine, blobs, user, coord, Driver(coord)


def create(engine, user, **req):
    from farm.store.db import session
    with session(engine) as s:
        job = diffusion.create_diffusion_job(s, user, {"model": "tiny-sd", "prompts": ["a cat"], "steps": 4,
                                                       "width": 64, "height": 64, **req})
        s.commit()
        return job.id


def test_diffusion_tasks_go_only_to_workers_holding_the_model_and_stay_where_it_is_loaded(env):
    engine, blobs, user, coord, d = env
    d.hello(b"bare", runtimes=RUNTIMES)
    d.hello(b"w1", runtimes=RUNTIMES, models=[TINY])
    d.hello(b"w2", runtimes=RUNTIMES, models=[TINY, {"name": "other", "hash": "", "error": "broken"}, "junk"])
    with pytest.raises(JobError, match="no worker has model 'sd-xl'"):
        create(engine, user, model="sd-xl")
    with pytest.raises(JobError, match="corrupt on every worker"):
        create(engine, user, model="other")
    job_id = create(engine, user, count=4, seed=10)
    tasks = rows(engine, Task, Task.job_id == job_id, order=Task.index)
    assert [t.spec["images"][0]["seed"] for t in tasks[:4]] == [10, 11, 12, 13] and tasks[4].kind == "contact_sheet"
    out = d.send((b"bare", P.Ready(1)))
    assert not of(out, P.Task), "a worker without the model got a diffusion task"
    first = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    assert len(first) == 1 and first[0].spec["model_hash"] == TINY["hash"]
    assert coord.conns[b"w1"].loaded == [TINY["hash"]] and coord.conns[b"w2"].loaded == []
    t = first[0]
    res = P.Result(t.task_id, t.attempt, [{**output_blob(blobs, 0, "img"), "name": t.spec["images"][0]["name"]}], 0.1)
    out = d.send((b"w1", res), (b"w1", P.Ready(1)))
    assert of(out, P.Ack)[0].accepted and of(out, P.Task, b"w1")
    assert not of(d.send((b"bare", P.Ready(1))), P.Task)
    # between free workers that hold the model, the one that has it loaded wins (over more free slots)
    w1, w2 = coord.conns[b"w1"], coord.conns[b"w2"]
    w1.free, w2.free, w2.loaded = 1, 4, []
    assert coord.scheduler.choose([], [w2, w1], TINY["hash"]) is w1
    # with no model to keep loaded, the choice is weighted (reputation × speed): either may get it
    assert {coord.scheduler.choose([], [w2, w1], None).worker_id for _ in range(64)} == {"w1", "w2"}


def test_img2img_job_is_released_by_its_render_job_and_fails_with_it(env):
    engine, blobs, user, coord, d = env
    d.hello(b"w1", runtimes=RUNTIMES, models=[TINY])
    render_id = make_job(engine, blobs, user, frames="1-2")
    sd_id = create(engine, user, init_from_job=render_id, prompts=["a", "b"], per_task=2)
    doomed_src = make_job(engine, blobs, user, frames="5")
    doomed = create(engine, user, init_from_job=doomed_src)
    tasks = rows(engine, Task, Task.job_id == sd_id, order=Task.index)
    assert [t.status for t in tasks] == ["waiting", "waiting"]
    images = tasks[0].spec["images"]
    assert [(im["name"], im["prompt"], im["init_name"]) for im in images] == \
        [("image_0000_frame_0001.png", "a", "frame_0001.png"), ("image_0001_frame_0002.png", "b", "frame_0002.png")]
    # once the render job is approved, its frames become the img2img task's inputs, and it is leased
    shas = {}
    for _ in range(2):
        (task,) = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
        assert task.kind == "render"
        outs = [output_blob(blobs, fr) for fr in task.spec["frames"]]
        shas.update({o["name"]: o["sha256"] for o in outs})
        out = d.send((b"w1", P.Result(task.task_id, task.attempt, outs, 1.0)))
        assert of(out, P.Ack)[0].accepted
    assert get(engine, Job, render_id).status == "rendered"
    d.tick(dt=1.0)  # sweeps run: rendered is not enough, nobody has paid for the frames yet
    assert [t.status for t in rows(engine, Task, Task.job_id == sd_id, order=Task.index)] == ["waiting", "waiting"]
    review.approve_job(engine, render_id, user)  # the creator pays for the frames: now they may feed a job
    out = d.send((b"w1", P.Ready(1)), dt=1.0)
    (task,) = of(out, P.Task, b"w1")
    assert task.job_id == sd_id and task.kind == "diffusion"
    assert task.inputs == [shas["frame_0001.png"], shas["frame_0002.png"]]
    assert task.spec["input_names"] == shas
    assert [im["source"]["sha256"] for im in task.spec["images"]] == [shas["frame_0001.png"], shas["frame_0002.png"]]
    # a source job that is canceled takes its waiting img2img job down with it
    coord.cancel_job(doomed_src, user)
    job = get(engine, Job, doomed)
    assert job.status == "failed" and f"source job {doomed_src} canceled" in job.error
    assert {t.status for t in rows(engine, Task, Task.job_id == doomed)} == {"canceled"}


def test_tiny_pipeline_is_reproducible_and_micro_batches_stay_within_rounding(tiny_model, pipe, tmp_path):
    from common.model_folders import check, folder_hash
    from worker.runtimes.tiny_pipeline import build
    again = build(tmp_path / "tiny-sd")
    assert check(again) == "" and folder_hash(again) == folder_hash(tiny_model), "the build is not deterministic"
    import torch
    prompts, seeds = ["a cat", "a dog", "a ship at sea", "a cat"], [3, 4, 5, 6]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    batch = pipe(prompts, generator=gens, num_inference_steps=STEPS, width=SIZE, height=SIZE, output_type="np").images
    single = np.concatenate([pipe(p, generator=torch.Generator("cpu").manual_seed(s), num_inference_steps=STEPS,
                                  width=SIZE, height=SIZE, output_type="np").images for p, s in zip(prompts, seeds)])
    diff = float(np.abs(batch - single).max())
    print(f"micro-batch of 4 vs single images: max float difference {diff:.2e}")
    assert diff < 1e-4
    to8 = lambda a: (a * 255).round().astype(int)  # noqa: E731  (as diffusers converts to PIL)
    assert np.abs(to8(batch) - to8(single)).max() <= 1
    assert json.loads((tiny_model / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_runtime_schedulers_errors_and_pipeline_cache(tiny_model, tmp_path):
    """The runtime child's logic, in process: every scheduler name runs, request faults are final, a model
    folder that is missing here is this worker's fault, and the pipeline cache stays within its budget."""
    import io

    import diffusers
    import torch

    import worker.runtimes.diffusion as R
    from common.limits import DIFFUSION_SCHEDULERS
    from common.model_folders import folder_hash
    R.torch, R.diffusers = torch, diffusers  # what main() does after setting the protocol fd aside
    proto = io.StringIO()
    rt = R.Runtime(proto, "none")
    assert (rt.device, rt.dtype) == ("cpu", torch.float32)
    digest = folder_hash(tiny_model)
    base = {"model_path": str(tiny_model), "model_name": "tiny-sd", "model_hash": digest, "mode": "txt2img",
            "steps": 2, "guidance": 7.5, "width": 64, "height": 64, "out_dir": str(tmp_path),
            "images": [{"name": "image_0000.png", "index": 0, "seed": 1, "prompt": "a cat", "negative": ""}]}
    for name in ["default", *DIFFUSION_SCHEDULERS]:
        rt.generate(1, {**base, "scheduler": name})
        done = json.loads(proto.getvalue().splitlines()[-1])
        assert done["event"] == "done" and done["loaded"] == (name == "default"), (name, done)
    with Image.open(tmp_path / "image_0000.png") as im:
        assert im.text["scheduler"] == DIFFUSION_SCHEDULERS["unipc"]
    with pytest.raises(R.RequestError, match="unknown scheduler"):
        rt.generate(2, {**base, "scheduler": "warp"})
    with pytest.raises(R.RequestError, match="over the model's limit of 77"):
        rt.generate(3, {**base, "images": [{**base["images"][0], "negative": "blurry " * 80}]})
    with pytest.raises(R.RequestError, match="not a multiple of 8"):
        rt.generate(4, {**base, "width": 60})
    with pytest.raises(R.WorkerFault, match="does not exist.*farm models tiny"):
        rt.generate(5, {**base, "model_hash": "0" * 64, "model_path": str(tmp_path / "gone")})
    # a budget that holds one pipeline: loading a second model evicts the first (the one in use stays)
    import shutil
    other = shutil.copytree(tiny_model, tmp_path / "tiny-other")
    rt.budget = rt.cache[digest]["bytes"] + 1
    rt.generate(6, {**base, "model_path": str(other), "model_hash": "1" * 64})
    assert list(rt.cache) == ["1" * 64]


class _Payload:
    """What a hostile model file carries: unpickling it calls ``open(marker, "w")``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_before_anything_loads_them(tiny_model, tmp_path):
    """A model folder is untrusted like a scene: a pickle runs code when loaded, so a folder holding one is
    unusable (with the way to convert it), the runtime refuses to load it, and the payload never runs."""
    import pickle
    import shutil

    import diffusers
    import torch

    import worker.runtimes.diffusion as R
    from common.model_folders import check, folder_hash, scan
    hostile = tmp_path / "models" / "hostile-sd"
    shutil.copytree(tiny_model, hostile)
    marker = tmp_path / "payload-ran"
    (hostile / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    problem = check(hostile)
    assert "unet/diffusion_pytorch_model.bin holds pickled weights" in problem and "safetensors" in problem
    [found] = scan([tmp_path / "models"], tmp_path / "hashes.json", hub=False)
    assert not found.ok and "pickled" in found.error  # never advertised, so no task is sent for it
    R.torch, R.diffusers = torch, diffusers
    rt = R.Runtime(io.StringIO(), "none")
    with pytest.raises(R.WorkerFault, match="pickled weights"):
        rt.generate(1, {"model_path": str(hostile), "model_name": "hostile", "model_hash": folder_hash(hostile),
                        "mode": "txt2img", "steps": 1, "guidance": 7.5, "width": 64, "height": 64,
                        "out_dir": str(tmp_path / "out"), "images": [{"name": "image_0000.png", "index": 0,
                                                                      "seed": 1, "prompt": "a cat"}]})
    assert not marker.exists(), "the pickle was loaded"
