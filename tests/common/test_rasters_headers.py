"""Untrusted images are refused from their headers, before a pixel is decoded (issue 18, untrusted images).

The attack: a worker uploads a small file whose header claims a huge image (a ZIP-compressed EXR of
30000×30000 zeros is 1.8 MB; before this check it decoded to +1.7 GB in 6.7 s, and only then was the size
refused). The hostile files here are real: valid ZIP-compressed EXR and PNG streams built with zlib
directly (one block compressed, then repeated), so that nothing allocates the image to make them, and
a real tiny EXR written by the OpenEXR module with its windows patched. Memory and time are measured in a
child process (VmHWM), so that this process's own history does not hide a peak.

Honest files, written by Pillow and the OpenEXR module, still decode to exactly the pixels written.
The helpers are imported by tests/web/test_previews_headers.py and tests/verify/test_compare_headers.py.
"""
from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import rasters
from common.limits import MAX_RESOLUTION

ROOT = Path(__file__).resolve().parents[2]
RSS_LIMIT_MB = 50
SECONDS_LIMIT = 0.5


# ------------------------------------------------------------------ crafting hostile files
def _attr(name: str, typ: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + typ.encode() + b"\0" + struct.pack("<i", len(value)) + value


def exr_header(width: int, height: int, channels=(("Y", 1),), compression: int = 3, flags: int = 0,
               extra: bytes = b"") -> bytes:
    """An OpenEXR 2 header (magic, version, the required attributes, end of header)."""
    chlist = b"".join(c.encode() + b"\0" + struct.pack("<iB3xii", t, 0, 1, 1) for c, t in channels) + b"\0"
    box = struct.pack("<4i", 0, 0, width - 1, height - 1)
    return (rasters.EXR_MAGIC + struct.pack("<I", 2 | flags) + _attr("channels", "chlist", chlist)
            + _attr("compression", "compression", bytes([compression])) + _attr("dataWindow", "box2i", box)
            + _attr("displayWindow", "box2i", box) + _attr("lineOrder", "lineOrder", b"\0")
            + _attr("pixelAspectRatio", "float", struct.pack("<f", 1)) + _attr("screenWindowCenter", "v2f", bytes(8))
            + _attr("screenWindowWidth", "float", struct.pack("<f", 1)) + extra + b"\0")


def zip_exr(width: int, height: int) -> bytes:
    """A valid ZIP-compressed scanline EXR of one half channel of zeros (16 lines a chunk; OpenEXR's
    predictor turns zeros into 0, 128, 128, …). Every full chunk is the same, so it is compressed once."""
    header = exr_header(width, height)

    def packed(lines: int) -> bytes:
        return zlib.compress(b"\0" + b"\x80" * (width * lines * 2 - 1), 9)

    nchunks = -(-height // 16)
    full, last = packed(16), packed(height - 16 * (nchunks - 1))
    pos, offsets, body = len(header) + 8 * nchunks, [], []
    for i in range(nchunks):
        data = full if i < nchunks - 1 else last
        offsets.append(pos)
        body.append(struct.pack("<ii", 16 * i, len(data)) + data)
        pos += 8 + len(data)
    return header + struct.pack(f"<{nchunks}Q", *offsets) + b"".join(body)


def zero_zlib(n: int, block: int = 1 << 22) -> bytes:
    """A zlib stream of ``n`` zero bytes that compresses three blocks only: after a full flush deflate
    starts afresh, so every further block encodes to the same bytes; adler32 of zeros is n mod 65521 << 16 | 1."""
    if n < 2 * block:
        return zlib.compress(bytes(n), 9)
    c = zlib.compressobj(9)
    first = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    rep = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    k, r = divmod(n, block)
    tail = c.compress(bytes(r)) + c.flush(zlib.Z_FINISH)
    return first + rep * (k - 1) + tail[:-4] + struct.pack(">I", ((n % 65521) << 16) | 1)


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def zero_png(width: int, height: int, color_type: int = 0) -> bytes:
    """A valid 8-bit PNG of zeros (every row filter 0), built without the image in memory."""
    nch = rasters.PNG_CHANNELS[color_type]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (rasters.PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zero_zlib(height * (1 + width * nch)))
            + png_chunk(b"IEND", b""))


def patched_exr(tmp_path: Path, width: int, height: int) -> Path:
    """A real 64×48 EXR written by the OpenEXR module, its data and display windows patched."""
    import OpenEXR
    src = tmp_path / "tiny.exr"
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"Y": np.zeros((48, 64), np.float16)}).write(str(src))
    data = bytearray(src.read_bytes())
    for key in (b"dataWindow\0box2i\0", b"displayWindow\0box2i\0"):
        i = data.index(key) + len(key) + 4
        data[i:i + 16] = struct.pack("<4i", 0, 0, width - 1, height - 1)
    out = tmp_path / "patched.exr"
    out.write_bytes(bytes(data))
    return out


def measure(call: str, path: Path) -> dict:
    """Run ``call`` (Python, with ``path`` bound) in a child that has already imported numpy, Pillow and
    OpenEXR: its outcome, seconds and growth of peak RSS (VmHWM) in MB."""
    script = f"""
import json, sys, time
from pathlib import Path
import numpy, OpenEXR
from PIL import Image, PngImagePlugin
from common import rasters
from farm.verify import compare
from farm.web import previews
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
path = Path(sys.argv[1])
before, t = hwm(), time.perf_counter()
try:
    result = {call}
    outcome = "ok: " + repr(result)[:300]
except Exception as exc:
    outcome = type(exc).__name__ + ": " + str(exc)
print(json.dumps({{"outcome": outcome, "seconds": time.perf_counter() - t, "rss_mb": (hwm() - before) / 1024}}))
"""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_cheap(m: dict) -> None:
    assert m["rss_mb"] < RSS_LIMIT_MB and m["seconds"] < SECONDS_LIMIT, m


SIZE_MESSAGE = ("{name}: the result is 30000×30000; the task asked for at most 64×48: render it at the task's "
                "resolution (the file was refused from its header, unread)")


# ------------------------------------------------------------------ hostile headers
def test_the_crafted_exr_is_a_valid_file(tmp_path):
    """The crafter makes files the OpenEXR library reads: the 30000×30000 one is no bluff."""
    import OpenEXR
    p = tmp_path / "small.exr"
    p.write_bytes(zip_exr(64, 50))
    planes = rasters.read(p, 64, 50).planes
    assert list(planes) == ["Y"] and planes["Y"].shape == (50, 64) and not planes["Y"].any()
    with OpenEXR.File(str(p)) as f:
        assert f.channels()["Y"].pixels.shape == (50, 64)


def test_a_compressed_exr_claiming_30000x30000_is_refused_from_its_header(tmp_path):
    p = tmp_path / "hostile.exr"
    p.write_bytes(zip_exr(30000, 30000))
    assert p.stat().st_size < 2_000_000  # 1.8 MB for 1.8 GB of pixels
    with pytest.raises(rasters.RasterError) as err:
        rasters.check_header(p, 64, 48)
    assert str(err.value) == SIZE_MESSAGE.format(name="hostile.exr")
    m = measure("rasters.read(path, 64, 48)", p)
    assert m["outcome"] == "RasterError: " + SIZE_MESSAGE.format(name="hostile.exr")
    assert_cheap(m)
    m = measure("rasters.read(path)", p)  # no task size: MAX_RESOLUTION is the bound
    assert m["outcome"] == (f"RasterError: hostile.exr: the result is 30000×30000; the farm accepts at most "
                            f"{MAX_RESOLUTION}×{MAX_RESOLUTION}: render it at the task's resolution (the file "
                            "was refused from its header, unread)")
    assert_cheap(m)


def test_a_real_tiny_exr_with_a_patched_data_window_is_refused(tmp_path):
    p = patched_exr(tmp_path, 30000, 30000)
    assert rasters.probe(p).width == 30000
    with pytest.raises(rasters.RasterError) as err:
        rasters.read(p, 64, 48)
    assert str(err.value) == SIZE_MESSAGE.format(name="patched.exr")
    assert_cheap(measure("rasters.check_header(path, 64, 48)", p))


@pytest.mark.parametrize("width,height,color_type", [(30000, 30000, 0), (12000, 12000, 6)])
def test_a_png_with_a_huge_ihdr_is_refused_from_its_header(tmp_path, width, height, color_type):
    """30000×30000 is past Pillow's own bomb limit (it raised DecompressionBombError, not RasterError);
    12000×12000 RGBA is under it (Pillow decoded it: +1.6 GB in 1.3 s) and under MAX_RESOLUTION, so only
    the task's size refuses it."""
    p = tmp_path / "hostile.png"
    p.write_bytes(zero_png(width, height, color_type))
    assert p.stat().st_size < 1_000_000
    m = measure("rasters.read(path, 64, 48)", p)
    assert m["outcome"] == (f"RasterError: hostile.png: the result is {width}×{height}; the task asked for at "
                            "most 64×48: render it at the task's resolution (the file was refused from its header, "
                            "unread)")
    assert_cheap(m)


def test_the_crafted_png_is_a_valid_file(tmp_path):
    p = tmp_path / "z.png"
    p.write_bytes(zero_png(3000, 2000, 2))
    r = rasters.read(p, 3000, 2000)
    assert r.planes[""].shape == (2000, 3000, 3) and not r.planes[""].any()


def test_channels_bytes_and_file_length_are_bounded_before_decoding(tmp_path):
    many = tmp_path / "many.exr"
    many.write_bytes(exr_header(64, 48, [(f"c{i:02d}", 2) for i in range(40)]))
    with pytest.raises(rasters.RasterError, match="many.exr has 40 channels; at most 16 are accepted"):
        rasters.read(many, 64, 48)
    fat = tmp_path / "fat.exr"  # 8 float channels of 64×48: 98,304 bytes, over 64×48×16 = 49,152
    fat.write_bytes(exr_header(64, 48, [(c, 2) for c in "ABCDEFGH"]))
    with pytest.raises(rasters.RasterError, match="would take 98,304 bytes decoded"):
        rasters.check_header(fat, 64, 48)
    long = tmp_path / "long.png"  # a 64×48 IHDR carrying 3 MB of something else
    long.write_bytes(zero_png(64, 48)[:33] + png_chunk(b"zzZz", bytes(3 << 20)) + png_chunk(b"IEND", b""))
    with pytest.raises(rasters.RasterError, match=r"long.png is 3,145,785 bytes, more than a 64×48 image can "
                                                  r"take \(1,052,477\)"):
        rasters.read(long, 64, 48)


@pytest.mark.parametrize("flags,what", [(rasters.EXR_TILED, "tiled"), (rasters.EXR_DEEP, "deep"),
                                        (rasters.EXR_MULTIPART, "multi-part")])
def test_tiled_deep_and_multipart_exr_are_refused_from_the_version_field(tmp_path, flags, what):
    p = tmp_path / "x.exr"
    p.write_bytes(exr_header(64, 48, flags=flags))
    with pytest.raises(rasters.RasterError, match=f"x.exr: {what} EXR is not supported; write a single-part"):
        rasters.probe(p)


def test_a_tiled_exr_written_by_openexr_is_refused(tmp_path):
    import OpenEXR
    p = tmp_path / "tiled.exr"
    OpenEXR.File({"type": OpenEXR.tiledimage, "tiles": OpenEXR.TileDescription()},
                 {"RGB": np.zeros((48, 64, 3), np.float16)}).write(str(p))
    with pytest.raises(rasters.RasterError, match="tiled EXR is not supported"):
        rasters.read(p, 64, 48)


def _garbage_cases() -> dict[str, bytes]:
    png = zero_png(64, 48, 2)

    def ihdr(w: int, h: int, d: int = 8, c: int = 2) -> bytes:
        return rasters.PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, d, c, 0, 0, 0))

    head = exr_header(64, 48)
    return {
        "empty": b"", "text": b"hello, world\n" * 10, "png signature only": rasters.PNG_SIGNATURE,
        "png half signature": rasters.PNG_SIGNATURE[:4], "png cut in IHDR": png[:20],
        "png bad IHDR crc": png[:29] + b"\0\0\0\0" + png[33:], "png zero width": ihdr(0, 48),
        "png bad depth": ihdr(64, 48, 3), "png palette 16 bit": ihdr(64, 48, 16, 3),
        "png first chunk not IHDR": rasters.PNG_SIGNATURE + png_chunk(b"IDAT", bytes(13)),
        "png IHDR of 12 bytes": rasters.PNG_SIGNATURE + png_chunk(b"IHDR", bytes(12)),
        "png cut in IDAT": png[:-40], "png no IEND": png[:-12],
        "exr magic only": rasters.EXR_MAGIC, "exr version 1": rasters.EXR_MAGIC + struct.pack("<I", 1) + head[8:],
        "exr unknown flag": rasters.EXR_MAGIC + struct.pack("<I", 2 | 0x4000) + head[8:],
        "exr cut in a name": head[:12], "exr no end of header": head[:-1],
        "exr name of 40 bytes": head[:8] + b"x" * 40 + b"\0int\0" + struct.pack("<i", 4) + bytes(4) + b"\0",
        "exr negative size": head[:8] + b"a\0int\0" + struct.pack("<i", -5) + b"\0",
        "exr size past end": head[:8] + b"a\0int\0" + struct.pack("<i", 1 << 30) + b"\0",
        "exr duplicate dataWindow": head[:-1] + _attr("dataWindow", "box2i", struct.pack("<4i", 0, 0, 29999, 29999))
        + b"\0",
        "exr no channels attribute": head[:8] + _attr("compression", "compression", b"\3") + b"\0",
        "exr channels of another type": head[:8] + _attr("channels", "string", b"RGB") + head[8:],
        "exr empty channel list": exr_header(64, 48, []),
        "exr pixel type 7": exr_header(64, 48, [("R", 7)]),
        "exr inverted data window": exr_header(64, 48)[:8] + _attr("channels", "chlist", b"R\0" + struct.pack(
            "<iB3xii", 1, 0, 1, 1) + b"\0") + _attr("compression", "compression", b"\0")
        + _attr("dataWindow", "box2i", struct.pack("<4i", 10, 10, 0, 0))
        + _attr("displayWindow", "box2i", struct.pack("<4i", 0, 0, 9, 9)) + b"\0",
        "exr compression 99": exr_header(64, 48, compression=99),
        "exr header only, no pixels": exr_header(64, 48),
        "exr header over 1 MiB": head[:-1] + _attr("note", "string", bytes(rasters.EXR_HEADER_MAX)) + b"\0",
    }


@pytest.mark.parametrize("case", list(_garbage_cases()))
def test_a_garbage_or_truncated_file_raises_a_clear_raster_error(tmp_path, case):
    p = tmp_path / "g.img"
    p.write_bytes(_garbage_cases()[case])
    with pytest.raises(rasters.RasterError) as err:
        rasters.read(p, 64, 48)
    assert str(err.value).startswith("g.img") and len(str(err.value)) > 20


def test_every_truncation_and_random_byte_flips_give_raster_errors_only(tmp_path):
    """What the fuzzing found (a PNG cut inside a chunk's CRC raised struct.error) stays found."""
    import OpenEXR
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 65535, (12, 16, 4), dtype=np.uint16).astype(np.uint8)).save(tmp_path / "b.png")
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"RGBA": rng.random((12, 16, 4)).astype(np.float16)}).write(str(tmp_path / "c.exr"))
    flips = random.Random(1)
    case = tmp_path / "case"
    for src in ("a.png", "b.png", "c.exr"):
        data = (tmp_path / src).read_bytes()
        variants = [data[:i] for i in range(len(data))]
        for _ in range(150):
            d = bytearray(data)
            for _ in range(flips.randint(1, 3)):
                d[flips.randrange(len(d))] = flips.randrange(256)
            variants.append(bytes(d))
        for v in variants:
            case.write_bytes(v)
            try:
                rasters.read(case, 16, 12)
            except rasters.RasterError:
                pass


# ------------------------------------------------------------------ honest files
def _honest_pngs(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    rng = np.random.default_rng(7)
    out = {}
    for mode, shape, dtype in (("RGB", (48, 64, 3), np.uint8), ("RGBA", (48, 64, 4), np.uint8),
                               ("L", (48, 64), np.uint8), ("I;16", (48, 64), np.uint16)):
        arr = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
        p = tmp_path / f"{mode.replace(';', '')}.png"
        Image.fromarray(arr, mode if mode != "I;16" else None).save(p)
        out[mode] = (p, arr.reshape(48, 64, -1))
    for nch in (3, 4):  # 16-bit colour: written by our own encoder (Pillow cannot write it)
        arr = rng.integers(0, 65535, (48, 64, nch), dtype=np.uint16)
        p = rasters.write(tmp_path / f"rgb{nch}_16.png", rasters.Raster("png", {"": arr}))
        out[f"16-bit x{nch}"] = (p, arr)
    return out


def test_honest_pngs_at_the_expected_size_decode_exactly_as_written(tmp_path):
    for mode, (p, arr) in _honest_pngs(tmp_path).items():
        r = rasters.read(p, 64, 48)
        assert r.planes[""].dtype == arr.dtype and np.array_equal(r.planes[""], arr), mode
        h = rasters.check_header(p, 64, 48)
        assert (h.kind, h.width, h.height, h.channels) == ("png", 64, 48, arr.shape[2]), mode
        with pytest.raises(rasters.RasterError, match="the task asked for at most 63×48"):
            rasters.read(p, 63, 48)


@pytest.mark.parametrize("compression", ["NO_COMPRESSION", "ZIP_COMPRESSION", "PIZ_COMPRESSION", "RLE_COMPRESSION"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_honest_exrs_at_the_expected_size_decode_exactly_as_written(tmp_path, compression, dtype):
    import OpenEXR
    px = np.random.default_rng(3).random((48, 64, 4)).astype(dtype)
    p = tmp_path / "f.exr"
    OpenEXR.File({"compression": getattr(OpenEXR, compression), "type": OpenEXR.scanlineimage},
                 {"RGBA": px}).write(str(p))
    h = rasters.probe(p)
    assert (h.kind, h.width, h.height, h.channel_names) == ("exr", 64, 48, ("A", "B", "G", "R"))
    assert h.compression == compression.split("_")[0].replace("NO", "none")
    assert h.decoded_bytes == 64 * 48 * 4 * px.itemsize
    r = rasters.read(p, 64, 48)
    for i, c in enumerate("RGBA"):
        bits = np.ascontiguousarray(px[..., i]).view(np.uint8)  # bit equality (NaN, -0 included)
        assert r.planes[c].dtype == dtype and np.array_equal(r.planes[c].view(np.uint8), bits)
    assert (r.width, r.height) == (64, 48) and "compression" in r.meta


def test_a_read_write_round_trip_is_unchanged_by_the_check(tmp_path):
    """The crop/stitch path (read → crop → write → read) keeps every bit, as before."""
    for mode, (p, arr) in _honest_pngs(tmp_path).items():
        tile = rasters.read(p).crop(8, 40, 4, 36)
        back = rasters.read(rasters.write(tmp_path / "t.png", tile), 32, 32)
        assert np.array_equal(back.planes[""], arr[4:36, 8:40]), mode
