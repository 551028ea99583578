"""Previews decode nothing before the header check: a hostile output is refused with a RasterError in
well under a second and without the memory its header claims (before: a 1.8 MB EXR claiming 30000×30000
took +1.7 GB and 6.4 s, then raised KeyError; a 561 KB RGBA PNG of 12000×12000 +1.1 GB and 3.1 s), and an
honest frame previews exactly as before."""
import io

import numpy as np
import pytest
from PIL import Image

from common import rasters
from farm.web.previews import PreviewCache, load_image, make_preview
from tests.common.test_rasters_headers import SIZE_MESSAGE, assert_cheap, exr_header, measure, zero_png, zip_exr


@pytest.mark.parametrize("kind", ["exr", "png"])
def test_a_hostile_output_is_refused_before_it_is_decoded(tmp_path, kind):
    p = tmp_path / f"hostile.{kind}"
    p.write_bytes(zip_exr(30000, 30000) if kind == "exr" else zero_png(30000, 30000))
    m = measure("previews.make_preview(path, (64, 48))", p)
    assert m["outcome"] == "RasterError: " + SIZE_MESSAGE.format(name=p.name)
    assert_cheap(m)
    cache = PreviewCache(tmp_path / "previews")
    with pytest.raises(rasters.RasterError, match="the result is 30000×30000; the farm accepts at most 16384×16384"):
        cache.get("a" * 64, p)  # no task size: MAX_RESOLUTION bounds it
    assert not list((tmp_path / "previews").iterdir()), "nothing cached"


def test_a_png_under_max_resolution_is_refused_at_the_task_size(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(zero_png(12000, 12000, 6))  # Pillow would decode this one (under its bomb limit)
    m = measure("previews.make_preview(path, (1920, 1080))", p)
    assert m["outcome"].startswith("RasterError: big.png: the result is 12000×12000; the task asked for at most "
                                   "1920×1080")
    assert_cheap(m)


@pytest.mark.parametrize("data,match", [
    (b"", r"g.img is empty \(0 bytes\)"), (b"GIF89a" + bytes(100), "neither a PNG nor an OpenEXR"),
    (zero_png(64, 48, 2)[:-40], "PNG image data cannot be decoded"),
    (exr_header(64, 48, [("B", 1), ("G", 1), ("R", 1)]), "cannot read the OpenEXR file"),  # header, no pixels
    (exr_header(64, 48, [("Y", 1)]), r"EXR has channels \['Y'\], no R, G and B to preview"),
])
def test_garbage_raises_a_raster_error_not_a_library_exception(tmp_path, data, match):
    p = tmp_path / "g.img"
    p.write_bytes(data)
    with pytest.raises(rasters.RasterError, match=match):
        make_preview(p, (64, 48))


def test_truncated_outputs_raise_raster_errors_only(tmp_path):
    import OpenEXR
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGBA": rng.random((24, 32, 4)).astype(np.float16)}).write(str(tmp_path / "b.exr"))
    case = tmp_path / "case"
    for src in ("a.png", "b.exr"):
        data = (tmp_path / src).read_bytes()
        for i in range(0, len(data), 3):
            case.write_bytes(data[:i])
            try:  # Pillow forgives a PNG cut after its last IDAT byte (no CRC, no IEND): all pixels are there
                assert load_image(case, 32, 24).size == (32, 24) and i >= len(data) - 20
            except rasters.RasterError:
                pass


def _old_load_png(path):
    """load_image's PNG path as it was before the header check."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(im, dtype=np.uint32)
            return Image.fromarray((arr >> 8).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGBA" if "A" in im.getbands() else "RGB")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_honest_frames_preview_exactly_as_before(tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (48, 64), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB").convert(mode)
    p = tmp_path / "f.png"
    im.save(p)
    got = load_image(p, 64, 48)
    want = _old_load_png(p)
    assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want))
    assert make_preview(p, (64, 48)) == make_preview(p)
    assert Image.open(io.BytesIO(make_preview(p, (64, 48)))).size == (32, 24)


def test_an_honest_exr_previews_at_its_size(tmp_path):
    import OpenEXR
    px = np.random.default_rng(2).random((48, 64, 4)).astype(np.float16)
    p = tmp_path / "f.exr"
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}, {"RGBA": px}).write(str(p))
    im = load_image(p, 64, 48)
    srgb = np.clip(px[..., :3].astype(np.float32), 0, 1)
    srgb = np.where(srgb <= 0.0031308, srgb * 12.92, 1.055 * np.power(srgb, 1 / 2.4) - 0.055)
    assert np.array_equal(np.asarray(im), (srgb * 255 + 0.5).astype(np.uint8))
    with pytest.raises(rasters.RasterError, match="the task asked for at most 64×47"):
        load_image(p, 64, 47)
