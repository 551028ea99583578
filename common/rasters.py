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
  frame, where it would describe one tile;
* files come from strangers (workers upload them): nothing is decoded before :func:`check_header` has
  read the header alone (PNG IHDR; EXR attributes, by a small reader of our own, before the OpenEXR
  library sees the file) and bounded the size, the channels, the decoded bytes and the file's length. A
  1.8 MB ZIP-compressed EXR that claims 30000×30000 pixels decoded to +1.7 GB in 6.7 s before; now it is
  refused in under a millisecond. Every error about a file's content is a :class:`RasterError`.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.limits import MAX_RESOLUTION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXR_MAGIC = b"\x76\x2f\x31\x01"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}          # colour type → samples a pixel
PNG_COLOR_TYPE = {n: t for t, n in PNG_CHANNELS.items()}
PNG_ZLIB_LEVEL = 3                               # frames and tiles: near level 6 in size, twice as fast
FILTER_ROWS = 256                                # rows filtered at once (bounds numpy's scratch memory)
EXR_WINDOW_KEYS = ("dataWindow", "displayWindow", "channels")

MAX_CHANNELS = 16
"""Most channels (PNG samples a pixel, EXR channels) an untrusted image may have. Blender's single-layer EXR
has 1 to 4 (5 with a Z pass); a multilayer EXR of every pass would need more, and is not what tasks write."""

MAX_BYTES_PER_PIXEL = 16
"""Decoded bytes a pixel may take by default (RGBA float32): with the size bound it bounds the memory a
decode may take, whatever the channel list says."""

FILE_SLACK = 1 << 20
"""Bytes a file may hold beyond its decoded size (metadata, offset tables, zlib framing). Neither PNG nor EXR
grows past its raw pixels by more (OpenEXR stores a chunk raw when compression would enlarge it), so a
longer file is refused before it is read into memory."""

EXR_HEADER_MAX = 1 << 20
"""Longest EXR header read (Blender's, with stamp metadata, is under 2 KB)."""

EXR_TILED, EXR_LONG_NAMES, EXR_DEEP, EXR_MULTIPART = 0x200, 0x400, 0x800, 0x1000   # version field flags
EXR_COMPRESSIONS = ("none", "RLE", "ZIPS", "ZIP", "PIZ", "PXR24", "B44", "B44A", "DWAA", "DWAB",
                    "HTJ2K256", "HTJ2K32", "LJ2K", "ZSTD")   # by the compression attribute's value
EXR_SAMPLE_BYTES = {0: 4, 1: 2, 2: 4}                       # pixel type UINT, HALF, FLOAT → bytes
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}   # colour type → depths


class RasterError(ValueError):
    """A file this module cannot read or write losslessly; the message says what it is."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel. ``channels``: samples a pixel once
    decoded (a palette PNG counts 3); ``channel_names``: EXR channel names (PNG: empty);
    ``decoded_bytes``: the memory its pixels take decoded; windows are EXR (x0, y0, x1, y1), inclusive."""
    kind: str
    width: int
    height: int
    channels: int
    decoded_bytes: int
    bit_depth: int = 0                       # PNG bits a sample
    color_type: int = -1                     # PNG colour type
    interlaced: bool = False
    compression: str = ""                    # EXR compression
    channel_names: tuple[str, ...] = ()
    subsampled: bool = False                 # an EXR channel with x/y sampling other than 1
    data_window: tuple[int, int, int, int] = (0, 0, 0, 0)
    display_window: tuple[int, int, int, int] = (0, 0, 0, 0)


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


def read(path: Path | str, max_width: int = MAX_RESOLUTION, max_height: int = MAX_RESOLUTION, *,
         max_channels: int = MAX_CHANNELS, name: str | None = None) -> Raster:
    """Read a PNG or an EXR (by content, not by name), refused from its header (:func:`check_header`)
    when it is bigger than ``max_width``×``max_height`` (what the task asked for, where the caller knows).
    ``name``: what error messages call the file (default: its file name; a blob's is its sha256)."""
    path = Path(path)
    name = name or path.name
    header = check_header(path, max_width, max_height, max_channels=max_channels, name=name)
    if header.kind == "png":
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RasterError(f"{name} cannot be read: {exc.strerror or exc}") from None
        return _read_png(data, name, header)
    return _read_exr(path, header, name)


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


# ------------------------------------------------------------------ headers (before any decode)
def probe(path: Path | str, name: str | None = None) -> ImageHeader:
    """The header of the PNG or EXR at ``path``, read without decoding: PNG's IHDR (its first 33 bytes),
    an EXR's attributes (at most EXR_HEADER_MAX bytes). Raises RasterError for anything else, truncated or
    malformed; refuses tiled, deep and multi-part EXR, which nothing here reads."""
    path = Path(path)
    name = name or path.name
    try:
        with open(path, "rb") as f:
            data = f.read(EXR_HEADER_MAX)
    except OSError as exc:
        raise RasterError(f"{name} cannot be read: {exc.strerror or exc}") from None
    if data[:8] == PNG_SIGNATURE:
        return _probe_png(data, name)
    if data[:4] == EXR_MAGIC:
        return _probe_exr(data, name)
    if not data:
        raise RasterError(f"{name} is empty (0 bytes)")
    if PNG_SIGNATURE.startswith(data[:8]) or EXR_MAGIC.startswith(data[:4]):
        raise RasterError(f"{name} is truncated: {len(data)} bytes, not even an image signature")
    raise RasterError(f"{name} is neither a PNG nor an OpenEXR file")


def check_header(path: Path | str, max_width: int = MAX_RESOLUTION, max_height: int = MAX_RESOLUTION, *,
                 max_channels: int = MAX_CHANNELS, max_bytes: int | None = None,
                 name: str | None = None) -> ImageHeader:
    """:func:`probe` the file and refuse it unless it fits: at most ``max_width``×``max_height`` pixels,
    ``max_channels`` channels, ``max_bytes`` decoded bytes (default: the size bound × MAX_BYTES_PER_PIXEL)
    and a file no longer than its pixels need. Callers pass the task's size where they know it; the
    default, MAX_RESOLUTION, is what any render may be. Returns the header; raises RasterError."""
    path = Path(path)
    name = name or path.name
    h = probe(path, name)
    asked = ("the farm accepts at most" if (max_width, max_height) == (MAX_RESOLUTION, MAX_RESOLUTION)
             else "the task asked for at most")
    if h.width > max_width or h.height > max_height:
        raise RasterError(f"{name}: the result is {h.width}×{h.height}; {asked} {max_width}×{max_height}: "
                          "render it at the task's resolution (the file was refused from its header, unread)")
    if h.channels > max_channels:
        raise RasterError(f"{name} has {h.channels} channels; at most {max_channels} are accepted: write "
                          "RGB or RGBA (a single-layer EXR, not a multilayer one of every pass)")
    limit = max_width * max_height * MAX_BYTES_PER_PIXEL if max_bytes is None else max_bytes
    if h.decoded_bytes > limit:
        raise RasterError(f"{name} would take {h.decoded_bytes:,} bytes decoded ({h.width}×{h.height}, "
                          f"{h.channels} channels); at most {limit:,} are accepted: write fewer channels or a "
                          "smaller sample type")
    size = os.stat(path).st_size
    longest = h.decoded_bytes + h.decoded_bytes // 50 + 16 * h.height + FILE_SLACK
    if size > longest:
        raise RasterError(f"{name} is {size:,} bytes, more than a {h.width}×{h.height} image can take "
                          f"({longest:,}): the file carries something else")
    return h


def _probe_png(data: bytes, name: str) -> ImageHeader:
    if len(data) < 33:
        raise RasterError(f"{name}: PNG is truncated inside its IHDR chunk ({len(data)} bytes)")
    n, ctype = struct.unpack(">I4s", data[8:16])
    if ctype != b"IHDR" or n != 13:
        raise RasterError(f"{name}: PNG does not start with a 13-byte IHDR chunk (found {ctype!r} of {n} bytes)")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise RasterError(f"{name}: PNG IHDR chunk is corrupt (bad CRC)")
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if not (1 <= w < 2**31 and 1 <= h < 2**31):
        raise RasterError(f"{name}: PNG IHDR gives a size of {w}×{h}, not a valid image")
    if depth not in PNG_DEPTHS.get(color, ()) or comp or filt or interlace > 1:
        raise RasterError(f"{name}: PNG IHDR is invalid (colour type {color}, {depth} bits, compression {comp}, "
                          f"filter {filt}, interlace {interlace})")
    nch = 3 if color == 3 else PNG_CHANNELS[color]
    return ImageHeader("png", w, h, nch, w * h * nch * (2 if depth == 16 else 1), bit_depth=depth,
                       color_type=color, interlaced=bool(interlace), data_window=(0, 0, w - 1, h - 1),
                       display_window=(0, 0, w - 1, h - 1))


def _cstr(data: bytes, pos: int, longest: int, name: str, what: str) -> tuple[str, int]:
    """The NUL-terminated string at ``pos`` (at most ``longest`` bytes) and the position after it."""
    end = data.find(b"\0", pos, pos + longest + 1)
    if end < 0:
        if len(data) - pos <= longest:
            raise RasterError(f"{name}: EXR header is truncated inside {what}")
        raise RasterError(f"{name}: EXR {what} is longer than {longest} bytes (a malformed header)")
    return data[pos:end].decode("latin-1"), end + 1


def _exr_attributes(data: bytes, name: str, longest: int) -> dict[str, tuple[str, bytes]]:
    """name → (type, value bytes) of the header attributes after the version field."""
    attrs: dict[str, tuple[str, bytes]] = {}
    pos = 8
    while True:
        if pos >= len(data):
            if len(data) >= EXR_HEADER_MAX:
                raise RasterError(f"{name}: EXR header is longer than {EXR_HEADER_MAX} bytes")
            raise RasterError(f"{name}: EXR header is truncated (no end of header)")
        key, pos = _cstr(data, pos, longest, name, "an attribute name")
        if not key:
            return attrs
        typ, pos = _cstr(data, pos, longest, name, f"the type of attribute {key!r}")
        if pos + 4 > len(data):
            raise RasterError(f"{name}: EXR header is truncated in attribute {key!r}")
        size = struct.unpack_from("<i", data, pos)[0]
        pos += 4
        if size < 0 or pos + size > len(data):
            raise RasterError(f"{name}: EXR attribute {key!r} claims {size} bytes, past the end of the header")
        if key in attrs:  # the library keeps the last one: refuse rather than read another header than it
            raise RasterError(f"{name}: EXR attribute {key!r} appears twice")
        attrs[key] = (typ, data[pos:pos + size])
        pos += size


def _exr_attr(attrs: dict, key: str, typ: str, size: int | None, name: str) -> bytes:
    if key not in attrs:
        raise RasterError(f"{name}: EXR header has no {key} attribute")
    got, value = attrs[key]
    if got != typ or (size is not None and len(value) != size):
        raise RasterError(f"{name}: EXR attribute {key} is a {got!r} of {len(value)} bytes, not a {typ}")
    return value


def _exr_channels(value: bytes, name: str, longest: int) -> list[tuple[str, int, int, int]]:
    """[(name, pixel type, x sampling, y sampling)] of a chlist attribute."""
    out, pos = [], 0
    while True:
        ch, pos = _cstr(value, pos, longest, name, "the channel list")
        if not ch:
            return out
        if pos + 16 > len(value):
            raise RasterError(f"{name}: EXR channel list is truncated at channel {ch!r}")
        ptype, _linear, xs, ys = struct.unpack_from("<iB3xii", value, pos)
        pos += 16
        if ptype not in EXR_SAMPLE_BYTES or xs < 1 or ys < 1:
            raise RasterError(f"{name}: EXR channel {ch!r} has pixel type {ptype} and sampling {xs}×{ys}, "
                              "not a valid channel")
        out.append((ch, ptype, xs, ys))


def _probe_exr(data: bytes, name: str) -> ImageHeader:
    if len(data) < 8:
        raise RasterError(f"{name}: EXR file is truncated inside its version field")
    version = struct.unpack_from("<I", data, 4)[0]
    flags = version & ~0xFF
    if version & 0xFF != 2 or flags & ~(EXR_TILED | EXR_LONG_NAMES | EXR_DEEP | EXR_MULTIPART):
        raise RasterError(f"{name}: EXR version field {version:#x} is not OpenEXR 2 (unknown version or flags)")
    for flag, what in ((EXR_MULTIPART, "multi-part"), (EXR_DEEP, "deep"), (EXR_TILED, "tiled")):
        if flags & flag:
            raise RasterError(f"{name}: {what} EXR is not supported; write a single-part scanline EXR "
                              "(Blender's OpenEXR output, not multilayer)")
    longest = 255 if flags & EXR_LONG_NAMES else 31
    attrs = _exr_attributes(data, name, longest)
    if "type" in attrs and attrs["type"][1].rstrip(b"\0") != b"scanlineimage":
        raise RasterError(f"{name}: EXR part type {attrs['type'][1][:40]!r} is not supported; write a scanline EXR")
    channels = _exr_channels(_exr_attr(attrs, "channels", "chlist", None, name), name, longest)
    if not channels:
        raise RasterError(f"{name}: EXR has no channels")
    comp = _exr_attr(attrs, "compression", "compression", 1, name)[0]
    if comp >= len(EXR_COMPRESSIONS):
        raise RasterError(f"{name}: EXR compression {comp} is unknown")
    dw = struct.unpack("<4i", _exr_attr(attrs, "dataWindow", "box2i", 16, name))
    disp = struct.unpack("<4i", _exr_attr(attrs, "displayWindow", "box2i", 16, name))
    w, h = dw[2] - dw[0] + 1, dw[3] - dw[1] + 1
    if w < 1 or h < 1 or disp[2] < disp[0] or disp[3] < disp[1]:
        raise RasterError(f"{name}: EXR data window {dw} or display window {disp} is empty")
    return ImageHeader("exr", w, h, len(channels), w * h * sum(EXR_SAMPLE_BYTES[c[1]] for c in channels),
                       compression=EXR_COMPRESSIONS[comp], channel_names=tuple(c[0] for c in channels),
                       subsampled=any(c[2] != 1 or c[3] != 1 for c in channels), data_window=dw,
                       display_window=disp)


# ------------------------------------------------------------------ PNG
def _chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 12 <= len(data):
        n, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body, end = data[pos + 8:pos + 8 + n], pos + 12 + n
        if end > len(data) or zlib.crc32(ctype + body) != struct.unpack(">I", data[end - 4:end])[0]:
            raise RasterError(f"{name}: PNG chunk {ctype!r} is truncated or corrupt")
        out.append((ctype, body))
        pos += 12 + n
        if ctype == b"IEND":
            return out
    raise RasterError(f"{name}: PNG ends without IEND (truncated)")


def _read_png(data: bytes, name: str, header: ImageHeader) -> Raster:
    """Decode a PNG whose header :func:`check_header` accepted. Pillow's own errors (a broken IDAT, its
    decompression-bomb limit) become RasterError, so a hostile file never raises anything else."""
    chunks = _chunks(data, name)
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise RasterError(f"{name}: PNG does not start with a 13-byte IHDR chunk")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if (w, h) != (header.width, header.height):  # the file changed after its header was checked
        raise RasterError(f"{name}: PNG is {w}×{h}, its checked header said {header.width}×{header.height}")
    if depth not in (8, 16) or ctype not in PNG_CHANNELS:
        raise RasterError(f"{name}: PNG of colour type {ctype} at {depth} bits; only 8/16-bit grey, RGB and "
                          "RGBA are supported")
    first_idat = next((i for i, (t, _) in enumerate(chunks) if t == b"IDAT"), None)
    if first_idat is None:
        raise RasterError(f"{name}: PNG has no image data (no IDAT chunk)")
    meta = [(t, d) for t, d in chunks[1:first_idat] if t[:1].islower()]  # ancillary chunks only
    nch = PNG_CHANNELS[ctype]
    if depth == 16 and nch > 1 and (interlace or nch == 2):
        raise RasterError(f"{name}: 16-bit {'interlaced ' if interlace else ''}PNG of {nch} channels is not "
                          "supported; write RGB or RGBA, not interlaced")
    try:
        return _decode_png(data, name, meta, w, h, depth, nch)
    except RasterError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError…
        raise RasterError(f"{name}: PNG image data cannot be decoded: {exc}") from None


def _decode_png(data: bytes, name: str, meta: list, w: int, h: int, depth: int, nch: int) -> Raster:
    from PIL import Image
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        if depth == 8 or nch == 1:  # Pillow keeps these exactly (16-bit grey is its "I;16B")
            arr = np.asarray(im)
            arr = arr.astype(">u2").astype(np.uint16) if depth == 16 else arr
            return Raster("png", {"": arr.reshape(h, w, nch)}, meta)
        tile = im.tile
        args = tile[0].args if len(tile) == 1 else None
        big = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
        if tile[0].codec_name != "zip" or big not in ("RGB;16B", "RGBA;16B"):
            raise RasterError(f"{name}: this Pillow decodes 16-bit PNG as {big!r}, not the expected raw mode; "
                              "16-bit PNG cannot be read losslessly here")
        high = np.asarray(im)
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
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
def _read_exr(path: Path, header: ImageHeader, name: str) -> Raster:
    """Decode an EXR whose header :func:`check_header` accepted; what this module cannot keep losslessly
    (a partial data window, subsampled channels) is refused from the header too, before decoding."""
    import OpenEXR
    if header.data_window != header.display_window or header.data_window[:2] != (0, 0):
        raise RasterError(f"{name}: the EXR data window differs from its display window or does not start "
                          "at 0,0; only whole images are supported")
    if header.subsampled:
        raise RasterError(f"{name}: subsampled EXR channels are not supported")
    try:
        f = OpenEXR.File(str(path), separate_channels=True)
        parts, attrs = len(f.parts), dict(f.header())
        planes = {k: np.ascontiguousarray(ch.pixels) for k, ch in f.channels().items()}
    except Exception as exc:  # the binding raises plain RuntimeError/ValueError with the library's reason
        raise RasterError(f"{name}: cannot read the OpenEXR file: {exc}") from None
    if parts != 1:
        raise RasterError(f"{name}: multi-part EXR is not supported (write a single-layer EXR)")
    for ch_name, plane in planes.items():
        if plane.shape[:2] != (header.height, header.width):  # the library read another header than ours
            raise RasterError(f"{name}: EXR channel {ch_name!r} decoded to {plane.shape[:2]}, its checked "
                              f"header said {header.height}×{header.width}")
    return Raster("exr", planes, {k: v for k, v in attrs.items() if k not in EXR_WINDOW_KEYS})


def _write_exr(path: Path, planes: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    import OpenEXR
    # the binding turns the dicts it is given into its own objects: hand it copies
    OpenEXR.File(dict(meta), {k: np.ascontiguousarray(v) for k, v in planes.items()}).write(str(path))
