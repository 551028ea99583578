"""A real project through the farm: `farm submit scene.blend` on a folder of textures, UDIMs, a sequence,
a font, libraries linking libraries, a relative and an absolute path; a real coordinator and a sandboxed
worker on loopback. The frames equal Blender's own render of the creator's folder; a missing texture is
reported at submit as written; a resubmit after changing one texture uploads that texture only (resumably,
with ``--resumable-above 0``)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.client.test_project import make_project
from tests.conftest import REPO, direct_render, pixels, wait_workers

pytestmark = pytest.mark.slow


def farm_cli(f, client, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RENDERHIVE_URL": f.url, "RENDERHIVE_TOKEN": client.token}
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def sent(res) -> int:
    m = re.search(r"(\d+) bytes uploaded", res.stdout)
    return int(m.group(1)) if m else 0


def render_as_blender(farm, worker, tmp_path, scene, frames: list[int]):
    """`farm submit SCENE --wait --approve` on a fresh farm with one worker; every frame must equal Blender's own
    render of the folder. Returns the farm, the creator, the submit's result and the reference frames."""
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    res = farm_cli(f, alice, "submit", str(scene), "--frames", f"{frames[0]}-{frames[-1]}", "--wait", "--approve",
                   "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stdout + res.stderr
    ref = direct_render(scene, tmp_path / "ref", frames)
    for frame, path in ref.items():
        got, want = pixels(tmp_path / "out" / f"frame_{frame:04d}.png"), pixels(path)
        assert np.array_equal(got, want), f"frame {frame} differs from Blender's own render"
    return f, alice, res, ref


def test_a_project_renders_as_blender_renders_its_folder(farm, worker, tmp_path):
    scene = make_project(tmp_path / "proj")
    f, alice, first, ref = render_as_blender(farm, worker, tmp_path, scene, [1, 2, 3])
    assert "14 files" in first.stderr and "approved; 3 files" in first.stdout
    # the sequence really advanced, and textures are not pink (the farm read every file)
    assert not np.array_equal(pixels(ref[1]), pixels(ref[3]))
    magenta = (pixels(ref[1])[..., :3] == [255, 0, 255]).all(-1).sum()
    assert magenta < 50  # only the UDIM tile 1002 is magenta on purpose (a few pixels of a 32x32 frame)

    # a resubmit after changing one texture uploads that texture only
    total = sum(p.stat().st_size for p in (tmp_path / "proj").rglob("*") if p.is_file())
    assert sent(first) >= total - 10**5   # everything the first time (the scene as a rewritten copy)
    tex = tmp_path / "proj" / "tex" / "a.png"
    data = bytearray(tex.read_bytes())
    tex.write_bytes(bytes(data) + b"\0")   # trailing bytes after IEND: a new blob, the same image
    again = farm_cli(f, alice, "submit", str(scene), "--frames", "1", "--resumable-above", "0")
    assert again.returncode == 0, again.stderr
    assert sent(again) == tex.stat().st_size   # through the resumable route (every file above 0 MiB)
    assert alice.upload_standing(hashlib.sha256(tex.read_bytes()).hexdigest())["complete"] is True
    unchanged = farm_cli(f, alice, "submit", str(scene), "--frames", "1")
    assert "0 bytes uploaded" in unchanged.stdout


def test_a_missing_texture_is_reported_at_submit_as_written(farm, worker, tmp_path):
    scene = make_project(tmp_path / "proj", missing=True)
    f = farm()
    worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    res = farm_cli(f, alice, "submit", str(scene), "--frames", "1")
    assert res.returncode == 2
    assert "image 'gone.png' in scene.blend reads '//tex/gone.png'" in res.stderr and "--allow-missing" in res.stderr
    assert "cache" not in res.stderr and alice.jobs() == []          # refused before any upload or job
    ok = farm_cli(f, alice, "submit", str(scene), "--frames", "1", "--allow-missing", "--wait", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    job = alice.job(int(ok.stdout.strip().splitlines()[-1]))
    assert job["status"] == "rendered", job
    assert job["spec"]["missing"][0]["path"] == "//tex/gone.png"


def test_a_sequencer_edit_renders_from_its_project_as_blender_renders_it(farm, worker, tmp_path):
    """Image strips (a 3-frame sequence over a still) read their media from the project tree: traced at
    submit, confined to the tree on the worker, and the frames equal Blender's own render of the folder."""
    scene = make_project(tmp_path / "edit", strips=True)
    _, _, res, ref = render_as_blender(farm, worker, tmp_path, scene, [1, 2, 3, 4])
    assert "5 files" in res.stderr   # the scene, the still and the sequence's 3 frames
    # the strips really show: the sequence changes frame to frame over the still, then ends (frame 4)
    assert len({pixels(ref[i]).tobytes() for i in (1, 2, 3, 4)}) == 4


def test_a_big_texture_reaches_the_worker_sealed_and_renders_as_blender_renders_it(farm, worker, tmp_path):
    """A texture over common.sealed.MIN_BYTES goes to the worker over the sealed channel of `farm serve`
    (sealed once on the coordinator's disk, sent by sendfile, opened with the key from CurveZMQ); the frame
    equals Blender's own render of the folder."""
    from PIL import Image

    from common import sealed as S
    scene = make_project(tmp_path / "proj")
    tex = tmp_path / "proj" / "tex" / "a.png"
    noise = np.random.default_rng(7).integers(0, 256, (1800, 1800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tex)  # noise does not compress: ~9.7 MB
    size = tex.stat().st_size
    assert size >= S.MIN_BYTES
    f, _, _, _ = render_as_blender(farm, worker, tmp_path, scene, [1])
    sealed = f.data / "blobs" / "sealed" / hashlib.sha256(tex.read_bytes()).hexdigest()
    assert sealed.stat().st_size == S.sealed_size(size), "the texture went sealed"
    import urllib.request
    page = urllib.request.urlopen(f.url + "/metrics", timeout=10).read().decode()
    sent = float(re.search(r"^renderhive_sealed_bytes_sent_total (\S+)$", page, re.M).group(1))
    assert sent >= S.sealed_size(size) - S.record_offset(1), "sent by the sealed server, all but the first record"
    assert "sealed blob channel on 127.0.0.1:" in (f.root / "serve.log").read_text()
