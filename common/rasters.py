"""Reading, cropping, stitching and writing the image files of tiles and frames, losslessly, without bpy.

Formats: PNG of 8 or 16 bits a sample (grey, RGB, RGBA; not interlaced at 16 bits) and single-part
scanline OpenEXR (half or float channels), i.e. what the Blender runtime writes. A :class:`Raster`
holds the pixels as numpy arrays and the file's metadata, so a tile cropped out of a render, or a frame
stitched from tiles, keeps what Blender wrote (colour space, stamp fields such as the frame number and
the frame-rate note the video encoder reads).

Invariants:

* read → crop/paste → write keeps every sample bit for bit (PNG samples, EXR half/float bits);
* Pillow 13 decodes a 16-bit PNG only to 8 bits. Its C decoder still undoes the PNG row filters right,
  so we let it decode twice: once with its big-endian raw mode (``RGBA;16B``: the high byte of every
  sample) and once with the little-endian one (``RGBA;16L``, which on big-endian data picks the low
  byte), and join the two planes. :func:`read` refuses a file where that does not apply rather than
  guess. Encoding is ours (numpy row filters chosen per row as libpng does, then zlib), 8 and 16 bits;
* metadata that describes one render attempt (render and sync times) is not carried into a stitched
  frame, where it would describe one tile.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXR_MAGIC = b"\x76\x2f\x31\x01"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}          # colour type → samples a pixel
PNG_COLOR_TYPE = {n: t for t, n in PNG_CHANNELS.items()}
PNG_ZLIB_LEVEL = 3                               # frames and tiles: near level 6 in size, twice as fast
FILTER_ROWS = 256                                # rows filtered at once (bounds numpy's scratch memory)
EXR_WINDOW_KEYS = ("dataWindow", "displayWindow", "channels")


class RasterError(ValueError):
    """A file this module cannot read or write losslessly; the message says what it is."""


@dataclass
class Raster:
    """Pixels and metadata of one image. ``planes``: PNG → {"": H×W×C uint8/uint16 array};
    EXR → {channel name: H×W float16/float32/uint32 array}. ``meta``: PNG → ancillary chunks
    [(type, data)] in file order; EXR → header attributes other than the windows and channel list."""
    kind: str
    planes: dict[str, np.ndarray]
    meta: Any = field(default_factory=list)

    @property
    def height(self) -> int:
        return next(iter(self.planes.values())).shape[0]

    @property
    def width(self) -> int:
        return next(iter(self.planes.values())).shape[1]

    def layout(self) -> tuple:
        """What must agree between tiles of one frame: format, channels, sample types."""
        return self.kind, tuple((k, v.dtype.str, v.shape[2:]) for k, v in sorted(self.planes.items()))

    def crop(self, x0: int, x1: int, y0: int, y1: int) -> "Raster":
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise RasterError(f"crop {x0}:{x1}×{y0}:{y1} is outside the {self.width}x{self.height} image")
        return Raster(self.kind, {k: np.ascontiguousarray(v[y0:y1, x0:x1]) for k, v in self.planes.items()},
                      self.meta)

    def blank(self, width: int, height: int) -> "Raster":
        """An image of the same layout and metadata, ``width``×``height``, all zero."""
        return Raster(self.kind, {k: np.zeros((height, width, *v.shape[2:]), v.dtype)
                                  for k, v in self.planes.items()}, self.meta)

    def paste(self, src: "Raster", x0: int, y0: int) -> None:
        for k, v in src.planes.items():
            self.planes[k][y0:y0 + v.shape[0], x0:x0 + v.shape[1]] = v


def read(path: Path | str) -> Raster:
    """Read a PNG or an EXR (by content, not by name)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == PNG_SIGNATURE:
        return _read_png(path.read_bytes(), path.name)
    if head[:4] == EXR_MAGIC:
        return _read_exr(path)
    raise RasterError(f"{path.name} is neither a PNG nor an OpenEXR file")


def write(path: Path | str, raster: Raster, drop_attempt_meta: bool = False) -> Path:
    """Write ``raster`` in its own format; ``drop_attempt_meta`` leaves out render/sync times."""
    path = Path(path)
    meta = _without_attempt_meta(raster) if drop_attempt_meta else raster.meta
    if raster.kind == "png":
        _write_png(path, raster.planes[""], meta)
    elif raster.kind == "exr":
        _write_exr(path, raster.planes, meta)
    else:
        raise RasterError(f"unknown raster kind {raster.kind!r}")
    return path


def text_meta(raster: Raster) -> dict[str, str]:
    """The image's text metadata: PNG tEXt chunks, EXR string attributes."""
    if raster.kind == "exr":
        return {k: v for k, v in raster.meta.items() if isinstance(v, str)}
    out = {}
    for ctype, data in raster.meta:
        if ctype == b"tEXt" and b"\0" in data:
            key, _, value = data.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
    return out


def _attempt_key(key: str) -> bool:
    return key == "RenderTime" or key.endswith("_time")


def _without_attempt_meta(raster: Raster) -> Any:
    if raster.kind == "exr":
        return {k: v for k, v in raster.meta.items() if not _attempt_key(k)}
    return [(t, d) for t, d in raster.meta
            if not (t == b"tEXt" and _attempt_key(d.partition(b"\0")[0].decode("latin-1")))]


# ------------------------------------------------------------------ PNG
def _chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 12 <= len(data):
        n, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if len(body) != n or zlib.crc32(ctype + body) != struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]:
            raise RasterError(f"{name}: PNG chunk {ctype!r} is truncated or corrupt")
        out.append((ctype, body))
        pos += 12 + n
        if ctype == b"IEND":
            return out
    raise RasterError(f"{name}: PNG ends without IEND (truncated)")


def _read_png(data: bytes, name: str) -> Raster:
    from PIL import Image
    chunks = _chunks(data, name)
    if chunks[0][0] != b"IHDR":
        raise RasterError(f"{name}: PNG does not start with IHDR")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth not in (8, 16) or ctype not in PNG_CHANNELS:
        raise RasterError(f"{name}: PNG of colour type {ctype} at {depth} bits; only 8/16-bit grey, RGB and "
                          "RGBA are supported")
    first_idat = next((i for i, (t, _) in enumerate(chunks) if t == b"IDAT"), None)
    if first_idat is None:
        raise RasterError(f"{name}: PNG has no image data (no IDAT chunk)")
    meta = [(t, d) for t, d in chunks[1:first_idat] if t[:1].islower()]  # ancillary chunks only
    nch = PNG_CHANNELS[ctype]
    with Image.open(io.BytesIO(data)) as im:
        if depth == 8 or nch == 1:  # Pillow keeps these exactly (16-bit grey is its "I;16B")
            arr = np.asarray(im)
            arr = arr.astype(">u2").astype(np.uint16) if depth == 16 else arr
            return Raster("png", {"": arr.reshape(h, w, nch)}, meta)
        if interlace or nch == 2:
            raise RasterError(f"{name}: 16-bit {'interlaced ' if interlace else ''}PNG of {nch} channels is not "
                              "supported; write RGB or RGBA, not interlaced")
        tile = im.tile
        args = tile[0].args if len(tile) == 1 else None
        big = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
        if tile[0].codec_name != "zip" or big not in ("RGB;16B", "RGBA;16B"):
            raise RasterError(f"{name}: this Pillow decodes 16-bit PNG as {big!r}, not the expected raw mode; "
                              "16-bit PNG cannot be read losslessly here")
        high = np.asarray(im)
    with Image.open(io.BytesIO(data)) as im:
        little = big.replace(";16B", ";16L")
        im.tile = [im.tile[0]._replace(args=little if isinstance(args, str) else (little, *args[1:]))]
        low = np.asarray(im)
    return Raster("png", {"": (high.astype(np.uint16) << 8) | low}, meta)


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _write_png(path: Path, pixels: np.ndarray, meta: list[tuple[bytes, bytes]]) -> None:
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    h, w, nch = pixels.shape
    if pixels.dtype not in (np.uint8, np.uint16) or nch not in PNG_COLOR_TYPE:
        raise RasterError(f"cannot write a PNG of {nch} channels of {pixels.dtype}")
    depth = 8 * pixels.dtype.itemsize
    raw = (pixels.astype(">u2") if depth == 16 else pixels).reshape(h, -1).view(np.uint8).reshape(h, -1)
    bpp = nch * depth // 8
    comp = zlib.compressobj(PNG_ZLIB_LEVEL)
    idat = []
    for r0 in range(0, h, FILTER_ROWS):
        prev = raw[r0 - 1] if r0 else None
        idat.append(comp.compress(_filter_rows(raw[r0:r0 + FILTER_ROWS], prev, bpp).tobytes()))
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, depth, PNG_COLOR_TYPE[nch], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(PNG_SIGNATURE + _chunk(b"IHDR", ihdr))
        for ctype, body in meta:
            f.write(_chunk(ctype, body))
        f.write(_chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b""))


def _filter_rows(rows: np.ndarray, prev: np.ndarray | None, bpp: int) -> np.ndarray:
    """PNG-filter ``rows`` (bytes, one image row each; ``prev`` is the row above the first): per row the
    filter with the smallest sum of absolute signed residuals (libpng's heuristic). Returns the rows with
    their filter-type byte in front."""
    x = rows.astype(np.int16)
    up = np.empty_like(x)
    up[0] = prev if prev is not None else 0
    up[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upleft = np.zeros_like(x)
    upleft[:, bpp:] = up[:, :-bpp]
    pa, pb, pc = np.abs(up - upleft), np.abs(left - upleft), np.abs(left + up - 2 * upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    candidates = np.stack([x, x - left, x - up, x - ((left + up) >> 1), x - paeth]) & 0xFF
    cost = np.abs(((candidates + 128) & 0xFF) - 128).sum(axis=2, dtype=np.int64)
    best = cost.argmin(axis=0)
    out = np.empty((x.shape[0], x.shape[1] + 1), np.uint8)
    out[:, 0] = best
    out[:, 1:] = np.take_along_axis(candidates, best[None, :, None], axis=0)[0]
    return out


# ------------------------------------------------------------------ OpenEXR
def _read_exr(path: Path) -> Raster:
    import OpenEXR
    try:
        f = OpenEXR.File(str(path), separate_channels=True)
    except Exception as exc:  # the binding raises plain RuntimeError/ValueError with the library's reason
        raise RasterError(f"{path.name}: cannot read the OpenEXR file: {exc}") from None
    if len(f.parts) != 1:
        raise RasterError(f"{path.name}: multi-part EXR is not supported (write a single-layer EXR)")
    header = dict(f.header())
    dw, disp = header.get("dataWindow"), header.get("displayWindow")
    if dw is None or disp is None or any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(dw, disp)) \
            or np.asarray(dw[0]).any():
        raise RasterError(f"{path.name}: the EXR data window differs from its display window or does not start "
                          "at 0,0; only whole images are supported")
    planes = {}
    for name, ch in f.channels().items():
        if ch.xSampling != 1 or ch.ySampling != 1:
            raise RasterError(f"{path.name}: subsampled EXR channel {name!r} is not supported")
        planes[name] = np.ascontiguousarray(ch.pixels)
    return Raster("exr", planes, {k: v for k, v in header.items() if k not in EXR_WINDOW_KEYS})


def _write_exr(path: Path, planes: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    import OpenEXR
    # the binding turns the dicts it is given into its own objects: hand it copies
    OpenEXR.File(dict(meta), {k: np.ascontiguousarray(v) for k, v in planes.items()}).write(str(path))
