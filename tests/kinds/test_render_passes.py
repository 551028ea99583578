"""Render passes as ControlNet conditions: a render job asks for depth, normal and mask; a real sandboxed
worker's Blender writes them next to each frame, equal to the same passes of a direct bpy render of the
sample scene, and the frames stay what they are without passes.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap

import numpy as np
import pytest
from PIL import Image

from client.api import ApiError
from farm.kinds import frames as splitter
from farm.kinds import tiles
from farm.kinds.frames import SpecError
from tests.conftest import PY, REPO, SAMPLE, TEST_SETTINGS, pixels, submit_sample, wait_job, wait_workers
from tests.kinds.test_diffusion import SD_ENV, STEPS, outputs_by_name
from tests.kinds.test_diffusion_controlnet import cn_models, tiny_model  # noqa: F401  (fixtures)

PASSES = ["depth", "normal", "mask"]

DIRECT = textwrap.dedent("""
    import json, sys
    import bpy
    from worker.runtimes import render_passes
    scene, out, frame, pct, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    bpy.ops.wm.open_mainfile(filepath=scene, load_ui=False, use_scripts=False)
    sc = bpy.context.scene
    sc.render.resolution_percentage, sc.cycles.samples = pct, samples
    sc.render.image_settings.media_type, sc.render.image_settings.file_format = "IMAGE", "PNG"
    sc.render.image_settings.color_mode, sc.render.image_settings.color_depth = "RGBA", "8"
    layer = bpy.context.view_layer
    render_passes.enable(layer, json.loads(sys.argv[6]))
    sc.frame_set(frame)
    sc.render.filepath = out + f"/frame_{frame:04d}.png"
    bpy.ops.render.render(animation=False, write_still=True)
    render_passes.write(bpy, sc, layer.name, out, frame, json.loads(sys.argv[6]))
""")


def test_passes_are_validated_at_submit():
    s = splitter.render_settings("PNG", None, 4, 20, passes="depth,normal")
    assert s["passes"] == ["depth", "normal"]
    [plan] = tiles.plan_job("ab" * 32, "3", 1, s)
    assert plan.outputs == ["frame_0003.png", "depth_0003.png", "normal_0003.png"]
    for bad in (["albedo"], ["depth", "depth"], 7):
        with pytest.raises(SpecError, match="passes must name each of depth, normal, mask"):
            splitter.render_settings("PNG", None, 4, 20, passes=bad)
    for kw in (dict(tiles="2x2"), dict(video=True)):
        with pytest.raises(SpecError, match="whole PNG frames"):
            tiles.plan_job("ab" * 32, "1-2", 1, s, **kw)
    with pytest.raises(SpecError, match="whole PNG frames"):
        tiles.plan_job("ab" * 32, "1", 1, splitter.render_settings("EXR", None, 4, 20, passes=["depth"]))


@pytest.mark.slow
def test_passes_written_by_the_worker_equal_a_direct_bpy_render(farm, worker, tmp_path):
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = submit_sample(alice, "1,5", passes=PASSES)
    plain = submit_sample(alice, "5")
    for j in (job, plain):
        assert wait_job(alice, j["id"])["status"] == "rendered"
    outs = alice.outputs(job["id"])
    assert sorted((o["frame"], o["name"]) for o in outs) == sorted((fr, f"{n}_{fr:04d}.png") for fr in (1, 5)
                                                                   for n in ("frame", *PASSES))
    files = outputs_by_name(alice, job["id"], tmp_path / "farm")
    plain_files = outputs_by_name(alice, plain["id"], tmp_path / "plain")
    assert np.array_equal(pixels(files["frame_0005.png"]), pixels(plain_files["frame_0005.png"])), \
        "asking for passes changed the frame"
    for fr in (1, 5):
        direct = tmp_path / f"direct{fr}"
        direct.mkdir()
        res = subprocess.run([PY, "-c", DIRECT, str(SAMPLE), str(direct), str(fr), str(TEST_SETTINGS["resolution_percent"]),
                              str(TEST_SETTINGS["samples"]), json.dumps(PASSES)], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        for name in PASSES:
            got, want = pixels(files[f"{name}_{fr:04d}.png"]), pixels(direct / f"{name}_{fr:04d}.png")
            assert got.shape == (48, 64, 3) and np.array_equal(got, want), f"{name} of frame {fr}"
        depth, mask = pixels(files[f"depth_{fr:04d}.png"]), pixels(files[f"mask_{fr:04d}.png"])
        assert 0 < (mask[..., 0] == 255).mean() < 1, "the mask covers the objects, not the background"
        assert depth[mask[..., 0] == 0].max() == 0 and depth.max() == 255  # background black, nearest white


def direct_control(models, nets: list[tuple[str, object, float]], seed: int, prompt: str) -> np.ndarray:
    """diffusers' ControlNet pipeline called directly: ControlNets by folder name, control images, weights."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image
    torch.set_num_threads(int(SD_ENV["RENDERHIVE_DIFFUSION_THREADS"]))
    loaded = [ControlNetModel.from_pretrained(models / "controlnets" / n, local_files_only=True) for n, _p, _w in nets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        models / "tiny-sd", controlnet=loaded, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for _n, path, _w in nets:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    out = pipe(prompt, image=images, controlnet_conditioning_scale=[w for _n, _p, w in nets],
               generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS, guidance_scale=7.5,
               width=images[0].width // 8 * 8, height=images[0].height // 8 * 8).images[0]
    return np.asarray(out)


@pytest.mark.slow
def test_control_from_job_takes_each_frames_passes_once_the_render_is_approved(farm, worker, tmp_path,
                                                                              cn_models):  # noqa: F811
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[cn_models])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    render = submit_sample(alice, "1-2", passes=["depth", "normal"])
    with pytest.raises(ApiError, match="rendered no mask pass"):
        alice.submit_diffusion(model="tiny-sd", prompts=["x"], control_from_job=render["id"],
                               controls=[{"name": "depth", "render_pass": "mask"}])
    sd = alice.submit_diffusion(model="tiny-sd", prompts=["a castle on a hill"], seed=70, steps=STEPS,
                                control_from_job=render["id"],
                                controls=[{"name": "depth", "weight": 0.8},
                                          {"name": "canny", "weight": 0.5, "render_pass": "normal"}])
    assert sd["tasks"].get("waiting") == 3, sd["tasks"]  # two images and the sheet wait for the approval
    assert wait_job(alice, render["id"])["status"] == "rendered"
    alice.approve(render["id"])
    done = wait_job(alice, sd["id"], timeout=120)
    assert done["status"] == "rendered", done
    passes = outputs_by_name(alice, render["id"], tmp_path / "render")
    files = outputs_by_name(alice, sd["id"], tmp_path / "sd")
    for i, fr in enumerate((1, 2)):
        name = f"image_{i:04d}_frame_{fr:04d}.png"
        with Image.open(files[name]) as im:
            meta = json.loads(im.text["renderhive"])
            assert im.size == (64, 48)  # the passes' size
        assert [c["pass"] for c in meta["controls"]] == ["depth", "normal"]
        assert (meta["source_job"], meta["source_frame"]) == (render["id"], fr)
        assert meta["source_control_sha256"] == [hashlib.sha256(passes[f"{p}_{fr:04d}.png"].read_bytes()).hexdigest()
                                                 for p in ("depth", "normal")]
        want = direct_control(cn_models, [("depth", passes[f"depth_{fr:04d}.png"], 0.8),
                                          ("canny", passes[f"normal_{fr:04d}.png"], 0.5)], 70 + i, "a castle on a hill")
        assert np.abs(pixels(files[name]).astype(int) - want.astype(int)).max() <= 1, name
