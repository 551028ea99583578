"""The cheap checks of a RESULT bound the file by the task's size from its header (compare.inspect with
compare.size_bound), and compare.image_size reads the header only: a hostile output costs the coordinator
neither memory nor time, and is refused with a message that says what was expected."""
import numpy as np
import pytest
from PIL import Image

from common.limits import MAX_RESOLUTION
from farm.kinds.frames import render_settings
from farm.verify import compare
from tests.common.test_rasters_headers import assert_cheap, measure, zero_png, zip_exr


@pytest.mark.parametrize("kind,spec,bound", [
    ("render", {"settings": render_settings("PNG", resolution=[64, 48])}, (64, 48)),
    ("render", {"settings": render_settings("EXR", resolution=[1920, 1080], resolution_percent=50)}, (960, 540)),
    ("render", {"settings": render_settings("PNG", resolution=[16000, 9000], resolution_percent=200)},
     (MAX_RESOLUTION, MAX_RESOLUTION)),
    ("render", {"settings": {**render_settings("PNG", resolution=[64, 48]),
                             "tile": {"cols": 2, "rows": 2, "col": 0, "row": 1, "overscan": None}}}, (64, 48)),
    ("render", {"settings": {**render_settings("PNG", resolution=[640, 480]), "max_resolution": 500}}, (500, 480)),
    ("render", {"settings": render_settings("PNG", resolution_percent=50)}, (MAX_RESOLUTION, MAX_RESOLUTION)),
    ("render", {}, (MAX_RESOLUTION, MAX_RESOLUTION)),
    ("diffusion", {"width": 512, "height": 768}, (512, 768)),
    ("diffusion", {"width": None, "height": None, "mode": "img2img"}, (MAX_RESOLUTION, MAX_RESOLUTION)),
    ("assemble", {"frames": [1], "cols": 2, "rows": 2}, (MAX_RESOLUTION, MAX_RESOLUTION)),
])
def test_size_bound_is_the_task_size_where_the_spec_gives_one(kind, spec, bound):
    assert compare.size_bound(kind, spec) == bound


@pytest.mark.parametrize("kind", ["exr", "png"])
def test_inspect_refuses_a_hostile_result_from_its_header(tmp_path, kind):
    p = tmp_path / "blob"  # blobs are stored under their sha256: messages use the output's name
    p.write_bytes(zip_exr(30000, 30000) if kind == "exr" else zero_png(30000, 30000))
    name = f"frame_0001.{kind}"
    found = compare.inspect(p, name, (64, 48))
    assert found.problem == (f"{name} cannot be read: {name}: the result is 30000×30000; the task asked for at "
                             "most 64×48: render it at the task's resolution (the file was refused from its header, "
                             "unread)")
    m = measure(f"compare.inspect(path, {name!r}, (64, 48)).problem", p)
    assert m["outcome"].startswith("ok: ") and "the result is 30000×30000" in m["outcome"]
    assert_cheap(m)
    m = measure("compare.image_size(path)", p)  # the check's crop placement reads the header only
    assert m["outcome"] == "ok: (30000, 30000)"
    assert_cheap(m)


def test_inspect_still_accepts_an_honest_result_at_the_task_size(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "blob"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p, "PNG")
    found = compare.inspect(p, "frame_0001.png", compare.size_bound(
        "render", {"settings": render_settings("PNG", resolution=[64, 48])}))
    assert (found.problem, found.suspicious, found.width, found.height) == ("", "", 64, 48)
    assert compare.image_size(p) == (64, 48)
    assert compare.inspect(p, "frame_0001.exr").problem == "frame_0001.exr is not a EXR file"
    flat = tmp_path / "flat"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(flat, "PNG")
    assert compare.inspect(flat, "frame_0001.png", (64, 48)).suspicious == "frame_0001.png is a single flat colour"
