"""Tiled frames and ``--video``: the grid and the plan, lossless image I/O and stitching, real Blender tiles
against full renders of the same frame (bit-identical without denoising, no visible seam with it), and
real `farm serve` / `farm worker` processes splitting frames across workers, losing one mid-tile, and
encoding the result.

Reference images are decoded independently of the code under test where it matters: ffmpeg (bundled with
imageio-ffmpeg) decodes 16-bit PNGs, since the farm's own reader relies on a Pillow raw-mode trick.
"""
from __future__ import annotations

import asyncio
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from client.api import ApiError
from common import rasters
from common import tiles as geometry
from farm.kinds import frames as splitter
from farm.kinds import tiles
from farm.kinds.frames import SpecError
from tests.conftest import PY, SAMPLE, direct_render, pixels, submit_sample, wait_for, wait_job, wait_workers
from worker.runtimes.process import RuntimeProcess
from worker.tasks.assemble import AssemblyError, assemble_frame, encode_video, frame_fps

SHA = "ab" * 32


# ------------------------------------------------------------------ helpers
def ffmpeg_decode(path, width: int, height: int, pix_fmt: str = "rgba64be", dtype: str = ">u2") -> np.ndarray:
    """Decode an image with ffmpeg (an implementation independent of common.rasters)."""
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", pix_fmt, "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype).reshape(height, width, -1).astype(np.uint16 if "64" in pix_fmt else np.uint8)


def same_bits(a: rasters.Raster, b: rasters.Raster) -> bool:
    return (sorted(a.planes) == sorted(b.planes)
            and all(a.planes[k].dtype == b.planes[k].dtype and a.planes[k].shape == b.planes[k].shape
                    and np.array_equal(a.planes[k].view(np.uint8), b.planes[k].view(np.uint8)) for k in a.planes))


def video_info(path) -> tuple[int, tuple[int, int], float]:
    frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return frames, tuple(meta["size"]), meta["fps"]


# ------------------------------------------------------------------ grid and plan (no Blender)
@pytest.mark.parametrize("width, height", [(333, 197), (16, 16), (17, 31), (1920, 1080), (5, 3)])
def test_grid_covers_every_pixel_exactly_once(width, height):
    for cols in range(1, min(width, 16) + 1):
        for rows in range(1, min(height, 16) + 1):
            cover = np.zeros((height, width), np.int32)
            for r in range(rows):
                for c in range(cols):
                    x0, x1, y0, y1 = geometry.tile_rect(cols, rows, c, r, width, height)
                    assert x1 > x0 and y1 > y0, "no empty tile"
                    cover[y0:y1, x0:x1] += 1
            assert (cover == 1).all(), f"{cols}x{rows} of {width}x{height}: gap or overlap"
    assert geometry.too_many_tiles(16, 16, 333, 197) == ""
    msg = geometry.too_many_tiles(16, 16, 10, 8)
    assert "at least 16x16 pixels" in msg and "10x8" in msg and "at most 10x8" in msg


def test_plan_of_a_tiled_job_with_video():
    settings = splitter.render_settings("PNG", "16", 4, 20)
    plans = tiles.plan_job(SHA, "3-4", 1, settings, "4x3", video=True)
    assert len(plans) == 2 * (12 + 1) + 1
    first = plans[:13]
    assert [p.kind for p in first] == ["render"] * 12 + ["assemble"]
    t = first[6]  # row 1, column 2 of frame 3
    assert t.outputs == ["tile_0003_r1_c2.png"] and not t.final and t.units == 1 and t.inputs == [SHA]
    assert t.spec["settings"]["tile"] == {"cols": 4, "rows": 3, "col": 2, "row": 1, "overscan": None}
    assert t.spec["settings"]["stamp_fps"] is True and t.spec["frames"] == [3]
    asm = first[12]
    assert asm.needs == list(range(12)) and asm.final and asm.units == 0
    assert asm.outputs == ["frame_0003.png"] and asm.spec["tiles"] == [p.outputs[0] for p in first[:12]]
    assert plans[25].needs == list(range(13, 25))
    enc = plans[-1]
    assert enc.kind == "encode" and enc.needs == [12, 25] and enc.outputs == ["video.mp4"]
    assert enc.spec["frame_names"] == ["frame_0003.png", "frame_0004.png"] and enc.spec["crf"] == 20
    assert sum(p.units for p in plans) == 24, "progress counts tiles"
    # untiled jobs: 1x1 is a plain frame job; --video works there too
    plain = tiles.plan_job(SHA, "1-5", 2, splitter.render_settings(), "1x1", video=True)
    assert [p.kind for p in plain] == ["render"] * 3 + ["encode"] and plain[-1].needs == [0, 1, 2]
    assert tiles.plan_job(SHA, "1", 1, splitter.render_settings(), None)[0].spec["settings"].get("tile") is None


@pytest.mark.parametrize("kwargs, words", [
    ({"tiles": "4"}, "is not COLSxROWS"), ({"tiles": "17x2"}, "1 to 16"), ({"tiles": "0x2"}, "1 to 16"),
    ({"tiles": "2x2", "chunk": 2}, "chunk and tiles"), ({"overscan": 8}, "tiled jobs only"),
    ({"tiles": "2x2", "overscan": 999}, "overscan must be"),
    ({"tiles": "16x16", "resolution": [10, 200]}, "at least 16x16 pixels, but this frame renders at 10x200"),
    ({"tiles": "4x4", "resolution": [40, 40], "percent": 5}, "renders at 2x2"),
])
def test_bad_tile_requests_are_refused_with_the_fix(kwargs, words):
    settings = splitter.render_settings("PNG", None, None, kwargs.pop("percent", None), kwargs.pop("resolution", None))
    with pytest.raises(SpecError, match=words):
        tiles.plan_job(SHA, "1", kwargs.pop("chunk", 1), settings, **kwargs)


# ------------------------------------------------------------------ image I/O, stitching, video (no Blender)
def synthetic(dtype, width=333, height=197, channels=4, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0:height, 0:width]
    smooth = (x * 977 + y * 331) % (top + 1)
    img = np.stack([smooth, smooth[::-1], rng.integers(0, top + 1, smooth.shape), np.full_like(smooth, top)][:channels],
                   axis=-1).astype(dtype)
    patch = img[height // 5:height // 2, width // 5:width * 3 // 5]
    patch[:] = rng.integers(0, top + 1, patch.shape)  # noise: every PNG filter gets used
    img[..., -1][::7] = rng.integers(0, top + 1, (len(range(0, height, 7)), width))  # alpha is kept too
    return img


@pytest.mark.parametrize("dtype, pix_fmt, ffdtype", [(np.uint8, "rgba", "u1"), (np.uint16, "rgba64be", ">u2")])
def test_png_round_trip_is_lossless_and_readable_by_ffmpeg(tmp_path, dtype, pix_fmt, ffdtype):
    img = synthetic(dtype)
    meta = [(b"tEXt", b"Note\0renderhive fps=30/1"), (b"tEXt", b"RenderTime\x0000:01.00")]
    path = rasters.write(tmp_path / "a.png", rasters.Raster("png", {"": img}, meta), drop_attempt_meta=True)
    assert np.array_equal(ffmpeg_decode(path, 333, 197, pix_fmt, ffdtype), img), "our PNG writer is standard"
    back = rasters.read(path)
    assert back.planes[""].dtype == dtype and np.array_equal(back.planes[""], img)
    assert rasters.text_meta(back) == {"Note": "renderhive fps=30/1"}, "attempt timings are dropped"
    assert frame_fps(back) == 30.0


@pytest.mark.slow
def test_16bit_png_written_by_blender_reads_exactly(tmp_path, blender_frames):
    path = blender_frames[("PNG", "16")]
    r = rasters.read(path)
    assert np.array_equal(r.planes[""], ffmpeg_decode(path, r.width, r.height))


@pytest.mark.parametrize("kind", ["png8", "png16", "exr16", "exr32"])
def test_assembling_odd_sized_tiles_is_exact(tmp_path, kind):
    w, h, cols, rows = 333, 197, 4, 3
    if kind.startswith("png"):
        full = rasters.Raster("png", {"": synthetic(np.uint8 if kind == "png8" else np.uint16)}, [])
    else:
        dt = np.float16 if kind == "exr16" else np.float32
        rng = np.random.default_rng(1)
        full = rasters.Raster("exr", {c: rng.standard_normal((h, w)).astype(dt) for c in "RGBA"},
                              {"compression": __import__("OpenEXR").ZIP_COMPRESSION, "Note": "n"})
    ext = "png" if kind.startswith("png") else "exr"
    grid = []
    for r in range(rows):
        grid.append([])
        for c in range(cols):
            x0, x1, y0, y1 = geometry.tile_rect(cols, rows, c, r, w, h)
            grid[-1].append(rasters.write(tmp_path / f"t{r}{c}.{ext}", full.crop(x0, x1, y0, y1)))
    assert assemble_frame(grid, tmp_path / f"frame.{ext}") == {"width": w, "height": h}
    assert same_bits(rasters.read(tmp_path / f"frame.{ext}"), full)
    # a tile of the wrong size (another resolution) is refused, never resized
    grid[1][2], grid[1][3] = grid[1][3], grid[1][2]  # 83 and 84 pixels wide
    with pytest.raises(AssemblyError, match="grid"):
        assemble_frame(grid, tmp_path / f"bad.{ext}")


def test_video_has_one_frame_per_job_frame_at_the_noted_fps(tmp_path):
    paths = []
    for i in range(5):
        img = synthetic(np.uint16, 64, 48, seed=i)
        img[..., 3] = 65535
        paths.append(rasters.write(tmp_path / f"frame_{i:04d}.png", rasters.Raster(
            "png", {"": img}, [(b"tEXt", b"Note\0renderhive fps=25/1")])))
    info = encode_video(paths, tmp_path / "video.mp4")
    assert info == {"frames": 5, "width": 64, "height": 48, "fps": 25.0}
    assert video_info(tmp_path / "video.mp4") == (5, (64, 48), 25.0)
    odd = [rasters.write(tmp_path / f"odd{i}.png", rasters.Raster("png", {"": synthetic(np.uint8, 65, 49, 3, i)}))
           for i in range(2)]
    assert encode_video(odd, tmp_path / "odd.mp4")["fps"] == 24.0  # no note: the default
    assert video_info(tmp_path / "odd.mp4")[:2] == (2, (66, 50)), "odd sizes are padded to even (yuv420p)"


# ------------------------------------------------------------------ real Blender tiles (runtime child)
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """The sample scene with OpenImageDenoise on, and with EEVEE."""
    d = tmp_path_factory.mktemp("tile_scenes")
    code = f"""
import bpy
for name, change in (("denoise", lambda sc: setattr(sc.cycles, "use_denoising", True)),
                     ("eevee", lambda sc: setattr(sc.render, "engine", "BLENDER_EEVEE"))):
    bpy.ops.wm.open_mainfile(filepath={str(SAMPLE)!r}, load_ui=False, use_scripts=False)
    change(bpy.context.scene)
    bpy.ops.wm.save_as_mainfile(filepath={str(d)!r} + "/" + name + ".blend", compress=True)
"""
    env = {"BLENDER_USER_RESOURCES": str(d / "bu"), "XDG_CACHE_HOME": str(d / "xc"), "PATH": "/usr/bin:/bin"}
    subprocess.run([PY, "-c", code], check=True, capture_output=True, timeout=120, env=env)
    return {"turntable": SAMPLE, "denoise": d / "denoise.blend", "eevee": d / "eevee.blend"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    loop = asyncio.new_event_loop()
    rt = RuntimeProcess("worker.runtimes.blender", ["--gpus", "none"], tmp_path_factory.mktemp("tile_rt"))
    loop.run_until_complete(rt.start())

    def request(scene, frames, out_dir, **settings):
        payload = {"op": "render", "scene": str(scene), "scene_key": str(scene), "frames": frames,
                   "out_dir": str(out_dir), "settings": settings}

        async def go():
            return [ev async for ev in rt.request(payload)][-1]
        return loop.run_until_complete(go())
    yield request
    loop.run_until_complete(rt.stop())
    loop.close()


def render_tiles(request, scene, out_dir, cols, rows, fmt="PNG", frame=5, **settings):
    """Render every tile of one frame; returns the assembled frame's path and the runtime's load count."""
    loads = set()
    for r in range(rows):
        for c in range(cols):
            ev = request(scene, [frame], out_dir, format=fmt, **settings,
                         tile={"cols": cols, "rows": rows, "col": c, "row": r, "overscan": settings.get("overscan")})
            assert ev["event"] == "done", ev
            assert not ev["reloaded"], "tiles of one frame never reload the scene"
            loads.add(ev["loads"])
    assert len(loads) == 1
    grid = [[out_dir / geometry.tile_name(frame, r, c, fmt) for c in range(cols)] for r in range(rows)]
    ext = "exr" if fmt == "EXR" else "png"
    assemble_frame(grid, out_dir / f"assembled_{cols}x{rows}.{ext}")
    return out_dir / f"assembled_{cols}x{rows}.{ext}"


FORMATS = [("PNG", "8"), ("PNG", "16"), ("EXR", "16"), ("EXR", "32")]
SMALL = {"samples": 16, "resolution_percent": 30}  # 96x72


@pytest.fixture(scope="module")
def blender_frames(runtime, tmp_path_factory):
    """Full (untiled) renders of frame 5 in every format, by the same runtime that renders the tiles."""
    out = {}
    for fmt, depth in FORMATS:
        d = tmp_path_factory.mktemp(f"full_{fmt}{depth}")
        ev = runtime(SAMPLE, [5], d, format=fmt, color_depth=depth, **SMALL)
        assert ev["event"] == "done", ev
        out[(fmt, depth)] = ev["outputs"][0]["path"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt, depth", FORMATS)
def test_assembled_tiles_are_bit_identical_to_the_full_render(runtime, blender_frames, tmp_path, fmt, depth):
    full = rasters.read(blender_frames[(fmt, depth)])
    assert (full.width, full.height) == (96, 72)
    for cols, rows in ((2, 2), (4, 4)):
        path = render_tiles(runtime, SAMPLE, tmp_path / f"{cols}", cols, rows, fmt, color_depth=depth, **SMALL)
        got = rasters.read(path)
        assert same_bits(got, full), f"{fmt}{depth} {cols}x{rows} differs from the full render"
        if fmt == "PNG":  # decoded independently too, and the stamp metadata came along
            assert rasters.text_meta(got)["Frame"] == "05" and "RenderTime" not in rasters.text_meta(got)


def seam_error(got: np.ndarray, ref: np.ndarray, cols: int, rows: int) -> tuple[float, float]:
    """Mean |got - ref| (in 8-bit steps) on 2-pixel bands across the internal seams, and elsewhere."""
    h, w = ref.shape[:2]
    band = np.zeros((h, w), bool)
    for x in geometry.edges(cols, w)[1:-1]:
        band[:, x - 2:x + 2] = True
    for y in geometry.edges(rows, h)[1:-1]:
        band[y - 2:y + 2, :] = True
    diff = np.abs(got[..., :3].astype(np.float64) - ref[..., :3]).mean(-1) / 257  # 16-bit → 8-bit steps
    return diff[band].mean(), diff[~band].mean()


@pytest.mark.slow
def test_denoised_tiles_with_overscan_show_no_seam(runtime, scenes, tmp_path):
    settings = {"color_depth": "16", "samples": 16, "resolution_percent": 50}  # 160x120, OpenImageDenoise on
    ev = runtime(scenes["denoise"], [5], tmp_path / "full", **settings)
    ref = rasters.read(ev["outputs"][0]["path"]).planes[""]
    for cols, rows in ((2, 2), (4, 4)):
        got = rasters.read(render_tiles(runtime, scenes["denoise"], tmp_path / f"auto{cols}", cols, rows,
                                        **settings)).planes[""]
        mse = np.mean(((got[..., :3].astype(np.float64) - ref[..., :3]) / 65535) ** 2)
        psnr = 10 * np.log10(1 / mse)
        seam, inner = seam_error(got, ref, cols, rows)
        bare = rasters.read(render_tiles(runtime, scenes["denoise"], tmp_path / f"bare{cols}", cols, rows,
                                         overscan=0, **settings)).planes[""]
        bare_seam, _ = seam_error(bare, ref, cols, rows)
        print(f"denoise {cols}x{rows}: PSNR {psnr:.1f} dB, seam error {seam:.3f}/255 (interior {inner:.3f}), "
              f"without overscan {bare_seam:.3f}/255")
        assert psnr >= 45
        assert seam < 1.0, "seams differ from the full render by less than one 8-bit step: invisible"
        assert bare_seam > 2 * seam, "the overscan margin is what removes the seam"


@pytest.mark.slow
def test_eevee_and_more_tiles_than_pixels_are_refused_by_the_worker(runtime, scenes, tmp_path):
    tile = {"cols": 2, "rows": 2, "col": 0, "row": 0, "overscan": None}
    ev = runtime(scenes["eevee"], [1], tmp_path, resolution_percent=10, tile=tile)
    assert ev["event"] == "error" and not ev["retryable"] and "BLENDER_EEVEE" in ev["message"]
    assert "without tiles" in ev["message"]
    ev = runtime(SAMPLE, [1], tmp_path, resolution=[12, 8], resolution_percent=100, tile={**tile, "cols": 16})
    assert ev["event"] == "error" and not ev["retryable"]
    assert "tiles 16x2 need a frame of at least 16x2 pixels, but this frame renders at 12x8" in ev["message"]
    # an untiled render after a tile renders the whole frame again (the scene's own border is restored)
    assert runtime(SAMPLE, [1], tmp_path / "tile", resolution_percent=10, tile=tile)["event"] == "done"
    ev = runtime(SAMPLE, [1], tmp_path / "plain", resolution_percent=10)
    assert ev["event"] == "done" and not ev["reloaded"]
    px = pixels(ev["outputs"][0]["path"])
    assert px.shape == (24, 32, 4) and (px[..., 3] == 255).all()


# ------------------------------------------------------------------ the farm: real processes
@pytest.mark.slow
def test_tiles_spread_over_two_workers_assemble_exactly_and_encode(farm, worker, reference_frames, tmp_path):
    f = farm()
    worker(f, "w1")
    worker(f, "w2")
    alice = f.creator("alice")
    wait_workers(alice, 2)
    job = submit_sample(alice, "1-2", tiles="4x4", video=True)
    assert job["tasks"]["total"] == 2 * 17 + 1 and job["units_total"] == 32, "progress counts tiles"
    # odd size, 16-bit, on the same farm meanwhile
    odd = submit_sample(alice, "3", tiles="4x3", resolution=[333, 197], resolution_percent=100, color_depth="16",
                        samples=4)
    with pytest.raises(ApiError, match="at least 16x16 pixels") as err:  # size known at submit: refused there
        submit_sample(alice, "1", tiles="16x16", resolution=[16, 12])
    assert err.value.status == 400
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    assert done["units_done"] == done["units_total"] == 32
    outs = alice.outputs(job["id"])
    assert sorted(o["name"] for o in outs) == ["frame_0001.png", "frame_0002.png", "video.mp4"], "tiles are not results"
    alice.approve(job["id"])
    paths = {p.name: p for p in alice.download_results(job["id"], tmp_path / "out")}
    for n in (1, 2):
        assert np.array_equal(pixels(paths[f"frame_{n:04d}.png"]), pixels(reference_frames[n])), \
            f"frame {n} assembled from 16 tiles differs from the direct bpy render"
    assert rasters.text_meta(rasters.read(paths["frame_0001.png"]))["Note"] == "renderhive fps=24/1", \
        "the scene's frame rate travels to the encoder in the frames' metadata"
    assert video_info(paths["video.mp4"]) == (2, (64, 48), 24.0)
    workers = {w["id"]: w["tasks_done"] for w in alice.workers()}
    assert workers["w1"] > 0 and workers["w2"] > 0, f"tiles spread over both workers: {workers}"

    assert wait_job(alice, odd["id"])["status"] == "rendered"
    alice.approve(odd["id"])
    got = alice.download_results(odd["id"], tmp_path / "odd")[0]
    ref = direct_render(SAMPLE, tmp_path / "odd_ref", [3], color_depth="16", samples=4, resolution_percent=100,
                        resolution=(333, 197))[3]
    assert got.read_bytes()[24] == 16
    assert np.array_equal(ffmpeg_decode(got, 333, 197), ffmpeg_decode(ref, 333, 197)), "no gap, no overlap"

    # the size known only on the worker: the tile task fails at once, with the reason
    small = submit_sample(alice, "1", tiles="16x16", resolution_percent=5)  # 16x12 pixels
    failed = wait_job(alice, small["id"])
    assert failed["status"] == "failed" and "at least 16x16 pixels, but this frame renders at 16x12" in failed["error"]


@pytest.mark.slow
def test_worker_killed_mid_tile_tile_is_released_and_frame_assembles(farm, worker, tmp_path):
    heavy = {"samples": 1024, "resolution_percent": 30}  # 96x72: each of 4 tiles renders for ~1 s
    f = farm()
    w1 = worker(f, "w1")
    alice = f.creator("alice")
    wait_workers(alice, 1)
    job = submit_sample(alice, "1", tiles="2x2", **heavy)

    def rendering():
        return any(t["status"] == "running" and t["worker_id"] == "w1" for t in alice.job(job["id"])["task_list"])
    wait_for(rendering, 60, interval=0.05, what="w1 rendering a tile")
    w1.kill()  # kill -9 the daemon and its Blender child mid-tile
    worker(f, "w2")
    done = wait_job(alice, job["id"])
    assert done["status"] == "rendered", done
    detail = alice.job(job["id"])
    assert any(t["attempt"] >= 2 for t in detail["task_list"] if t["index"] < 4), "a tile was re-leased"
    alice.approve(job["id"])
    got = alice.download_results(job["id"], tmp_path / "out")[0]
    ref = direct_render(SAMPLE, tmp_path / "ref", [1], **heavy)[1]
    assert np.array_equal(pixels(got), pixels(ref))
