"""Watermarked, downscaled previews of a job's outputs (the fair exchange: full resolution after approval).

A preview is a PNG at most PREVIEW_MAX_SIDE pixels on its longer side and never more than half the
original's size, with a visible diagonal watermark over the whole image, so it is good enough to judge a
frame but not to use it. EXR frames are tone-mapped (clipped, sRGB-encoded) first. Previews are cached by
the output's sha256 under ``DATA/previews``; the original blob is never served before approval.

Outputs are workers' uploads: :func:`load_image` decodes nothing before ``rasters.check_header`` has bounded
the file from its header (the task's size where the caller passes it, else MAX_RESOLUTION), and a file
that cannot be a preview raises RasterError, never a Pillow or OpenEXR exception.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common import rasters
from common.limits import MAX_RESOLUTION

PREVIEW_MAX_SIDE = 480
WATERMARK = "RENDERHIVE PREVIEW"


def _load_exr(path: Path, header: rasters.ImageHeader) -> Image.Image:
    import OpenEXR  # only needed for EXR outputs

    names = set(header.channel_names)
    if not {"R", "G", "B"} <= names:  # checked from the header: a Y or Z only EXR has no colour to show
        raise rasters.RasterError(f"{path.name}: EXR has channels {sorted(names)}, no R, G and B to preview")
    try:
        with OpenEXR.File(str(path)) as f:
            channels = f.channels()
            if "RGBA" in channels or "RGB" in channels:
                rgb = np.asarray(channels.get("RGBA", channels.get("RGB")).pixels, dtype=np.float32)
            else:
                rgb = np.stack([np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGB"], axis=-1)
    except Exception as exc:  # the binding raises plain RuntimeError/ValueError with the library's reason
        raise rasters.RasterError(f"{path.name}: cannot read the OpenEXR file: {exc}") from None
    rgb = np.clip(np.nan_to_num(rgb[..., :3]), 0.0, 1.0)
    srgb = np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)
    return Image.fromarray((srgb * 255 + 0.5).astype(np.uint8), "RGB")


def load_image(path: Path, max_width: int = MAX_RESOLUTION, max_height: int = MAX_RESOLUTION) -> Image.Image:
    """Any output frame as an 8-bit RGB(A) Pillow image, refused from its header (RasterError) when it is
    larger than ``max_width``×``max_height`` or not a PNG or EXR."""
    path = Path(path)
    header = rasters.check_header(path, max_width, max_height)
    if header.kind == "exr":
        return _load_exr(path, header)
    try:
        with Image.open(path, formats=["PNG"]) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.uint32)
                return Image.fromarray((arr >> 8).astype(np.uint8), "L").convert("RGB")
            return im.convert("RGBA" if "A" in im.getbands() else "RGB")
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError…
        raise rasters.RasterError(f"{path.name}: PNG image data cannot be decoded: {exc}") from None


def watermark(im: Image.Image) -> Image.Image:
    """Tile a semi-transparent diagonal text over the whole image, plus a solid band at the bottom."""
    im = im.convert("RGBA")
    w, h = im.size
    layer = Image.new("RGBA", (w * 2, h * 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    size = max(10, min(w, h) // 8)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # old Pillow without scalable default font
        font = ImageFont.load_default()
    step_x, step_y = size * 11, size * 3
    for y in range(0, h * 2, step_y):
        for x in range(-step_x if (y // step_y) % 2 else 0, w * 2, step_x):
            draw.text((x, y), WATERMARK, fill=(255, 255, 255, 110), font=font, stroke_width=1,
                      stroke_fill=(0, 0, 0, 110))
    layer = layer.rotate(30, resample=Image.BICUBIC)
    left, top = (layer.width - w) // 2, (layer.height - h) // 2
    out = Image.alpha_composite(im, layer.crop((left, top, left + w, top + h)))
    if h >= 120:  # a caption band where there is room for it
        band = max(14, h // 12)
        ImageDraw.Draw(out).rectangle((0, h - band, w, h), fill=(20, 20, 20, 200))
        ImageDraw.Draw(out).text((4, h - band + 2), "preview · approve for full resolution",
                                 fill=(255, 255, 255, 255), font=ImageFont.load_default())
    return out


def make_preview(path: Path, max_size: tuple[int, int] | None = None) -> bytes:
    """PNG bytes of the watermarked, downscaled preview of the output at ``path``; ``max_size`` (width,
    height): the most its task allows (None: MAX_RESOLUTION)."""
    im = load_image(path, *(max_size or (MAX_RESOLUTION, MAX_RESOLUTION)))
    w, h = im.size
    scale = min(PREVIEW_MAX_SIDE / max(w, h), 0.5)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    watermark(im).save(buf, "PNG", optimize=False)
    return buf.getvalue()


class PreviewCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, sha256: str, source: Path, max_size: tuple[int, int] | None = None) -> Path:
        """The cached preview of blob ``sha256`` (made from ``source`` on first use, refused with RasterError
        when its header says more than ``max_size``)."""
        dest = self.root / f"{sha256}.png"
        if not dest.exists():
            data = make_preview(source, max_size)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return dest
