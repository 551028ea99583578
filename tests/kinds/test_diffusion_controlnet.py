"""ControlNets on the farm: tiny random ControlNets (``farm models tiny-controlnet``) in a worker's
``controlnets/`` folder, checked and hashed at worker start, control images uploaded as blobs, tasks only
on workers holding every ControlNet, and images equal to diffusers' ``StableDiffusionControlNetPipeline``
(one ControlNet or a MultiControlNetModel) called directly with the same seed and inputs.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError
from common import model_folders
from tests.conftest import PY, REPO, pixels, wait_workers
from tests.kinds.test_diffusion import SD_ENV, STEPS, _Payload, outputs_by_name, tiny_model  # noqa: F401

PROMPT = "a castle on a hill"
NETS = {"depth": 1, "canny": 2}  # name → seed of its random weights


@pytest.fixture(scope="session")
def cn_models(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    """A models folder holding tiny-sd and ``controlnets/depth``, ``controlnets/canny``."""
    from worker.runtimes.tiny_pipeline import build_controlnet
    root = tmp_path_factory.mktemp("cn-models")
    shutil.copytree(tiny_model, root / "tiny-sd")
    for name, seed in NETS.items():
        build_controlnet(tiny_model, root / "controlnets" / name, seed=seed)
    return root


def control_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    out = []
    for name in ("depth.png", "edges.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / name)
        out.append(folder / name)
    return out


def direct(models: Path, nets: list[tuple[str, Path, float]], seed: int) -> np.ndarray:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    loaded = [ControlNetModel.from_pretrained(models / "controlnets" / n, local_files_only=True) for n, _i, _w in nets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        models / "tiny-sd", controlnet=loaded[0] if len(loaded) == 1 else loaded, local_files_only=True,
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    imgs = []
    for _n, path, _w in nets:
        with Image.open(path) as im:
            imgs.append(im.convert("RGB"))
    scales = [w for _n, _i, w in nets]
    out = pipe(PROMPT, image=imgs[0] if len(imgs) == 1 else imgs,
               controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
               generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS, guidance_scale=7.5,
               width=64, height=64).images[0]
    return np.asarray(out)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_controlnet_folders_are_checked_and_hashed(cn_models, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(cn_models, root)
    nets = root / "controlnets"
    marker = tmp_path / "payload-ran"
    shutil.copytree(nets / "depth", nets / "pickled")
    (nets / "pickled" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    shutil.copytree(root / "tiny-sd" / "vae", nets / "not-a-controlnet")
    found = {m.name: m for m in model_folders.scan([root], tmp_path / "hashes.json", hub=False)}
    assert sorted(found) == ["canny", "depth", "not-a-controlnet", "pickled", "tiny-sd"]  # controlnets/ is no model
    assert found["depth"].ok and found["depth"].kind == "controlnet"
    assert found["depth"].hash == model_folders.folder_hash(nets / "depth")
    assert "pickled weights" in found["pickled"].error and not marker.exists()
    assert "not a ControlNetModel" in found["not-a-controlnet"].error
    monkeypatch.setattr(model_folders, "CONTROLNET_MAX_BYTES", 1000)
    assert "over the limit" in model_folders.check_controlnet(nets / "depth")


@pytest.mark.slow
def test_controlnet_jobs_run_where_the_controlnets_are_and_equal_diffusers(farm, worker, cn_models, tiny_model,  # noqa: F811
                                                                          tmp_path):
    f = farm()
    worker(f, "w-cn", env=SD_ENV, models=[cn_models])
    worker(f, "w-plain", env=SD_ENV, models=[tiny_model.parent])
    alice = f.creator("alice")
    wait_workers(alice, 2)
    depth, edges = control_images(tmp_path / "in")

    def submit(*args: str) -> dict:
        res = subprocess.run([PY, "-m", "client.cli", "submit-diffusion", "--url", f.url, "--token", alice.token,
                              "--json", "--model", "tiny-sd", "--prompt", PROMPT, "--size", "64x64", "--steps",
                              str(STEPS), *args, "--wait"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 0, res.stderr
        return alice.job(int(res.stdout.strip().splitlines()[-1]))

    both = submit("--count", "2", "--seed", "21", "--control", "depth:0.8", "--control-image", str(depth),
                  "--control", "canny:0.5", "--control-image", str(edges))
    one = submit("--seed", "30", "--control", "canny", "--control-image", str(edges))
    for job in (both, one):
        assert job["status"] == "rendered", job
        assert {o["worker_id"] for o in alice.outputs(job["id"]) if o["name"].startswith("image_")} == {"w-cn"}
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (depth, edges)}
    net_hash = {n: model_folders.folder_hash(cn_models / "controlnets" / n) for n in NETS}
    files = outputs_by_name(alice, both["id"], tmp_path / "both")
    for k in range(2):
        with Image.open(files[f"image_{k:04d}.png"]) as im:
            meta = json.loads(im.text["renderhive"])
        assert meta["controls"] == [
            {"name": "depth", "hash": net_hash["depth"], "weight": 0.8, "image_sha256": sha[depth]},
            {"name": "canny", "hash": net_hash["canny"], "weight": 0.5, "image_sha256": sha[edges]}]
        want = direct(cn_models, [("depth", depth, 0.8), ("canny", edges, 0.5)], 21 + k)
        assert worst(pixels(files[f"image_{k:04d}.png"]), want) <= 1, f"image {k}"
    files = outputs_by_name(alice, one["id"], tmp_path / "one")
    assert worst(pixels(files["image_0000.png"]), direct(cn_models, [("canny", edges, 1.0)], 30)) <= 1

    # the job page shows the conditions: each ControlNet with its weight, hash and control image
    import httpx
    with httpx.Client(base_url=f.url, timeout=30) as http:
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text).group(1)
        http.post("/login", data={"csrf": csrf, "token": alice.token})
        page = http.get(f"/jobs/{both['id']}").text
    line = " ".join(page[page.index('id="conditions"'):].split("</p>")[0].split())
    assert f"<code>depth</code> × 0.8 ({net_hash['depth'][:12]}, control image {sha[depth][:12]})" in line, line
    assert f"<code>canny</code> × 0.5 ({net_hash['canny'][:12]}, control image {sha[edges][:12]})" in line, line

    ok = dict(model="tiny-sd", prompts=[PROMPT], steps=STEPS, width=64, height=64)
    cases = [(dict(ok, controls=[{"name": "seg", "image": sha[depth]}]), "no worker has ControlNet 'seg'"),
             (dict(ok, controls=[{"name": "depth"}]), "needs a control image"),
             (dict(ok, controls=[{"name": "depth", "image": "ab" * 32}]), "is not uploaded"),
             (dict(ok, controls=[{"name": "depth", "image": sha[depth]}], init_from_job=999999,
                   control_from_job=999998), "must come from the same render job")]
    before = len(alice.jobs())
    for req, message in cases:
        with pytest.raises(ApiError, match=message):
            alice.submit_diffusion(**req)
    assert len(alice.jobs()) == before, "an invalid request queued a job"
