"""``farm stylise``: one command renders the sample scene with a depth pass on a real farm (real `farm serve`,
a real sandboxed worker with Blender, the tiny pipeline and a tiny depth ControlNet), stylises each frame
over its pass with fixed seeds, approves and downloads. Run twice, it renders and stylises anew (four
jobs) and gives the same pixels. Bad input is refused before anything is submitted; a diffusion job the
farm refuses cancels the render submitted for it.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PY, REPO, SAMPLE, TEST_SETTINGS, pixels, wait_workers
from tests.kinds.test_diffusion import SD_ENV
from tests.kinds.test_diffusion_controlnet import cn_models, tiny_model  # noqa: F401  (fixtures)


def stylise(f, token: str, out, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "client.cli", "stylise", str(SAMPLE), "--url", f.url, "--token", token,
                           "--frames", "1-3", "--model", "tiny-sd", "--prompt", "a castle on a hill",
                           "--samples", str(TEST_SETTINGS["samples"]),
                           "--resolution-percent", str(TEST_SETTINGS["resolution_percent"]),
                           "--steps", "3", "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_stylise_twice_gives_the_same_images(farm, worker, cn_models, tmp_path):  # noqa: F811
    f = farm()
    worker(f, "w1", env=SD_ENV, models=[cn_models])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    runs = []
    for k in range(2):
        res = stylise(f, alice.token, tmp_path / f"run{k}", "--control", "depth:0.8", "--seed", "7", "--approve",
                      "--json")
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    jobs = {r["render_job"] for r in runs} | {r["diffusion_job"] for r in runs}
    assert len(jobs) == 4, "the second run reused the first run's jobs instead of rendering again"
    names = [f"image_{i:04d}_frame_{i + 1:04d}.png" for i in range(3)]
    for k in range(2):
        got = sorted(p.name for p in (tmp_path / f"run{k}").iterdir() if p.name.startswith("image_"))
        assert got == names
        assert sorted(p.name for p in (tmp_path / f"run{k}" / "render").iterdir()) == \
            sorted([f"frame_{i:04d}.png" for i in (1, 2, 3)] + [f"depth_{i:04d}.png" for i in (1, 2, 3)])
    for i, name in enumerate(names):
        a, b = pixels(tmp_path / "run0" / name), pixels(tmp_path / "run1" / name)
        assert a.shape == (48, 64, 3) and np.array_equal(a, b), f"{name} differs between the two runs"
        with Image.open(tmp_path / "run0" / name) as im:
            meta = json.loads(im.text["renderhive"])
        assert int(im.text["seed"]) == 7 + i and meta["controls"][0]["name"] == "depth"
        assert meta["controls"][0]["weight"] == 0.8
    # the frames stylised differ from each other (the geometry moved), so equality above is not trivial
    assert not np.array_equal(pixels(tmp_path / "run0" / names[0]), pixels(tmp_path / "run0" / names[2]))

    # refused before anything is submitted: a control that takes no known pass, a pass not rendered
    before = len(alice.jobs())
    for args, message in ((["--control", "seg", "--seed", "1"], "which render pass"),
                          (["--control", "depth", "--passes", "normal", "--seed", "1"], "does not render")):
        res = stylise(f, alice.token, tmp_path / "bad", *args)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(alice.jobs()) == before
    # the farm refuses the diffusion job (no worker holds that ControlNet): the render is canceled with it
    res = stylise(f, alice.token, tmp_path / "bad", "--control", "ink=depth", "--seed", "1")
    assert res.returncode == 2 and "ControlNet 'ink'" in res.stderr, res.stderr
    (render,) = [j for j in alice.jobs() if j["id"] not in jobs]
    assert render["status"] == "canceled"
    # without --approve and no terminal to ask: it stops after the render, says how to go on
    res = stylise(f, alice.token, tmp_path / "ask", "--control", "depth:0.8", "--seed", "7")
    assert res.returncode == 3 and "farm approve" in res.stdout, res.stdout + res.stderr
