"""Previews are smaller than the frame and visibly watermarked (they differ from the frame everywhere the
watermark runs), for 8-bit PNG, 16-bit PNG and EXR frames."""
import io

import numpy as np
import pytest
from PIL import Image

from farm.web.previews import PREVIEW_MAX_SIDE, PreviewCache, make_preview


def _frame(tmp_path, w=320, h=240):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    p = tmp_path / "frame.png"
    Image.fromarray(rgb, "RGB").save(p)
    return p, rgb


def test_preview_is_smaller_and_watermarked(tmp_path):
    path, rgb = _frame(tmp_path)
    prev = np.asarray(Image.open(io.BytesIO(make_preview(path))).convert("RGB")).astype(int)
    assert prev.shape[0] <= rgb.shape[0] // 2 and prev.shape[1] <= rgb.shape[1] // 2
    plain = np.asarray(Image.fromarray(rgb).resize((prev.shape[1], prev.shape[0]), Image.LANCZOS)).astype(int)
    diff = np.abs(prev - plain).max(axis=-1)
    assert (diff > 40).mean() > 0.05, "watermark not visible"
    # the watermark covers the whole image, not one corner: every quarter is marked
    h, w = diff.shape
    for q in (diff[:h // 2, :w // 2], diff[:h // 2, w // 2:], diff[h // 2:, :w // 2], diff[h // 2:, w // 2:]):
        assert (q > 40).any()


def test_large_frames_are_capped(tmp_path):
    path, _ = _frame(tmp_path, 1920, 1080)
    prev = Image.open(io.BytesIO(make_preview(path)))
    assert max(prev.size) == PREVIEW_MAX_SIDE


@pytest.mark.parametrize("kind", ["png16", "exr"])
def test_high_depth_frames(tmp_path, kind):
    import OpenEXR
    h, w = 48, 64
    if kind == "exr":
        px = np.random.default_rng(0).random((h, w, 4)).astype(np.float16)
        path = tmp_path / "f.exr"
        OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                     {"RGBA": px}).write(str(path))
    else:
        path = tmp_path / "f16.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 65535, (h, w), dtype=np.uint16)).save(path)
    prev = Image.open(io.BytesIO(make_preview(path)))
    assert prev.size == (32, 24)


def test_cache_reuses(tmp_path):
    path, _ = _frame(tmp_path)
    cache = PreviewCache(tmp_path / "previews")
    a = cache.get("a" * 64, path)
    mtime = a.stat().st_mtime_ns
    assert cache.get("a" * 64, path).stat().st_mtime_ns == mtime
