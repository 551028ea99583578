"""The worker side of result verification: region renders (exactly the same rectangle of a full render),
the ``verify`` executor, the benchmark score and its cache, and the cheating worker used by the coordinator's
verification tests (tests/helpers/cheater.py).

Real parts only: one Blender runtime child for the module (64x48, 4 samples), real daemons and, for the
command-line flags and the cheater process, real `farm serve` / `farm worker` processes.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from common import limits as L
from common import rasters
from tests.conftest import PY, SAMPLE, TEST_SETTINGS, submit_sample, wait_for, wait_workers
from tests.helpers.cheater import MODES, STALE_OFFSET, Cheater
from worker import benchmark as bench
from worker import settings as W
from worker.daemon import WorkerDaemon
from worker.runtimes.process import RuntimeProcess
from worker.tasks.executors import EXECUTORS, TaskContext, TaskFailure

pytestmark = pytest.mark.slow

SHA = hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
FORMATS = {"png8": {"format": "PNG", "color_depth": "8"}, "exr16": {"format": "EXR", "color_depth": "16"}}
REGIONS = [[0, 64, 0, 48], [10, 30, 5, 20], [0, 1, 0, 1], [63, 64, 47, 48], [31, 33, 0, 48], [0, 64, 23, 25],
           [40, 64, 30, 48]]


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def rt(loop, tmp_path_factory):
    proc = RuntimeProcess("worker.runtimes.blender", ["--gpus", "none"], tmp_path_factory.mktemp("verify_rt"))
    loop.run_until_complete(proc.start())
    yield proc
    loop.run_until_complete(proc.stop())


def render(loop, rt, out_dir: Path, frame: int = 5, **settings) -> dict:
    payload = {"op": "render", "scene": str(SAMPLE), "scene_key": SHA, "frames": [frame], "out_dir": str(out_dir),
               "settings": {**TEST_SETTINGS, **settings}}

    async def go():
        return [ev async for ev in rt.request(payload)][-1]
    return loop.run_until_complete(go())


def same_bits(a: rasters.Raster, b: rasters.Raster) -> bool:
    return (sorted(a.planes) == sorted(b.planes)
            and all(a.planes[k].dtype == b.planes[k].dtype and a.planes[k].shape == b.planes[k].shape
                    and np.array_equal(a.planes[k].view(np.uint8), b.planes[k].view(np.uint8)) for k in a.planes))


def context(rt, kind: str, spec: dict, out_dir: Path, task_id: int = 1, progress: list | None = None) -> TaskContext:
    out_dir.mkdir(parents=True, exist_ok=True)

    async def runtime():
        return rt
    return TaskContext(task_id, 1, kind, spec, {SHA: SAMPLE}, out_dir,
                       lambda done, of, msg: (progress if progress is not None else []).append((done, of, msg)),
                       runtime)


def run(loop, executor, ctx):
    return loop.run_until_complete(executor(ctx))


@pytest.fixture(scope="module")
def honest(loop, rt, tmp_path_factory) -> dict:
    """Full renders by the module's runtime: frame 5 in both formats, and frames 1, 2, 14 (cheater
    references), and frame 2 at 1 sample."""
    d = tmp_path_factory.mktemp("honest")
    out = {}
    for name, fmt in FORMATS.items():
        ev = render(loop, rt, d / name, 5, **fmt)
        assert ev["event"] == "done", ev
        out[name] = Path(ev["outputs"][0]["path"])
    for f in (1, 2, 2 + STALE_OFFSET):
        out[f] = Path(render(loop, rt, d / f"f{f}", f)["outputs"][0]["path"])
    out["2@1"] = Path(render(loop, rt, d / "one_sample", 2, samples=1)["outputs"][0]["path"])
    return out


# ------------------------------------------------------------------ region renders
@pytest.mark.parametrize("fmt", FORMATS)
def test_region_render_is_exactly_the_crop_of_the_full_render(loop, rt, honest, tmp_path, fmt):
    full = rasters.read(honest[fmt])
    assert (full.width, full.height) == (64, 48)
    times = []
    for region in REGIONS:
        for overscan in (None, 0, 8):   # auto (0 here: no denoising, no adaptive sampling), none, a margin
            ev = render(loop, rt, tmp_path / f"{overscan}", **FORMATS[fmt], region=region, overscan=overscan)
            assert ev["event"] == "done", ev
            out = Path(ev["outputs"][0]["path"])
            x0, x1, y0, y1 = region
            assert out.name == f"region_0005_{x0}_{x1}_{y0}_{y1}.{fmt[:3]}"
            got = rasters.read(out)
            assert (got.width, got.height) == (x1 - x0, y1 - y0)
            assert same_bits(got, full.crop(*region)), f"{fmt} region {region} overscan {overscan}"
            assert not ev["reloaded"]
            times.append(ev["outputs"][0]["seconds"])
    print(f"\n{fmt}: {len(times)} region renders of 64x48, median {np.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms")
    # the scene's own border is back for a whole-frame render
    ev = render(loop, rt, tmp_path / "whole", **FORMATS[fmt])
    assert same_bits(rasters.read(ev["outputs"][0]["path"]), full)


@pytest.mark.parametrize("settings, words", [
    ({"region": [0, 65, 0, 48]}, "outside the 64x48 frame"),
    ({"region": [10, 10, 0, 48]}, "is empty or outside"),
    ({"region": [0, 64, 30, 20]}, "is empty or outside"),
    ({"region": [-1, 4, 0, 4]}, "is empty or outside"),
    ({"region": [0, 4, 0, 49]}, "0 <= y0 < y1 <= 48"),
    ({"region": [0, 4, 0]}, "'region' must be [x0, x1, y0, y1]"),
    ({"region": [0, 4.0, 0, 4]}, "'region' must be [x0, x1, y0, y1]"),
    ({"region": "0,4,0,4"}, "'region' must be [x0, x1, y0, y1]"),
    ({"region": [0, 4, 0, 4], "overscan": -1}, "overscan must be"),
    ({"region": [0, 4, 0, 4], "tile": {"cols": 2, "rows": 2, "col": 0, "row": 0}}, "either a 'tile' or a 'region'"),
])
def test_bad_regions_are_refused_with_the_rule(loop, rt, tmp_path, settings, words):
    ev = render(loop, rt, tmp_path, **settings)
    assert ev["event"] == "error" and ev["retryable"] is False and words in ev["message"], ev
    assert not list(tmp_path.iterdir())
    assert render(loop, rt, tmp_path / "after", region=[0, 8, 0, 8])["event"] == "done"


def test_a_region_needs_no_tile_grid_but_one_frame(loop, rt, tmp_path):
    # 1x1-pixel regions of a 4x4 frame: fine (a 16x16 tile grid would be refused here)
    ev = render(loop, rt, tmp_path, resolution=[4, 4], resolution_percent=100, region=[3, 4, 3, 4])
    assert ev["event"] == "done" and rasters.read(ev["outputs"][0]["path"]).width == 1
    payload = {"op": "render", "scene": str(SAMPLE), "scene_key": SHA, "frames": [1, 2], "out_dir": str(tmp_path),
               "settings": {**TEST_SETTINGS, "region": [0, 4, 0, 4]}}

    async def go():
        return [ev async for ev in rt.request(payload)][-1]
    ev = loop.run_until_complete(go())
    assert ev["event"] == "error" and "a region request renders exactly one frame" in ev["message"]


# ------------------------------------------------------------------ the verify executor
@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_task_returns_each_region_under_its_name(loop, rt, honest, tmp_path, fmt):
    assert EXECUTORS["verify"][0] == "blender"
    verify = EXECUTORS["verify"][1]
    ext = ".exr" if fmt == "exr16" else ".png"
    settings = {**TEST_SETTINGS, **FORMATS[fmt], "resolution": None}
    regions = [[8, 24, 4, 16], [40, 64, 30, 48], [0, 64, 0, 1]]
    spec = {"scene_sha256": SHA, "frames": [5], "settings": settings, "regions": regions,
            "outputs": [f"check_{i}{ext}" for i in range(3)]}
    progress: list = []
    t0 = time.perf_counter()
    produced = run(loop, verify, context(rt, "verify", spec, tmp_path / "regions", progress=progress))
    wall = time.perf_counter() - t0
    full = rasters.read(honest[fmt])
    assert [p.name for p in produced] == spec["outputs"]
    assert sorted(p.name for p in (tmp_path / "regions").iterdir() if p.is_file()) == spec["outputs"]
    for p, region in zip(produced, regions):
        assert p.frame == 5 and p.seconds > 0 and p.path == tmp_path / "regions" / p.name
        assert same_bits(rasters.read(p.path), full.crop(*region))
    assert [(d, of) for d, of, _ in progress] == [(1, 3), (2, 3), (3, 3)]
    print(f"\nverify {fmt}: 3 regions in {wall * 1000:.0f} ms wall, render seconds {[p.seconds for p in produced]}")
    # regions [] = the whole frame
    whole = run(loop, verify, context(rt, "verify", {**spec, "regions": [], "outputs": [f"check_0{ext}"]},
                                      tmp_path / "whole"))
    assert [p.name for p in whole] == [f"check_0{ext}"]
    assert same_bits(rasters.read(whole[0].path), full)


@pytest.mark.parametrize("change, words", [
    ({"settings": {**TEST_SETTINGS, "tile": {"cols": 2, "rows": 2, "col": 0, "row": 0}}}, "must not carry a tile"),
    ({"frames": [1, 2]}, "exactly one frame"),
    ({"outputs": ["check_0.png"]}, "one plain .png file name"),
    ({"outputs": ["check_0.exr", "check_1.exr"]}, "one plain .png file name"),
    ({"outputs": ["../check_0.png", "check_1.png"]}, "one plain .png file name"),
    ({"regions": [[0, 65, 0, 4], [0, 4, 0, 4]]}, "outside the 64x48 frame"),
])
def test_bad_verify_specs_fail_for_good(loop, rt, tmp_path, change, words):
    spec = {"scene_sha256": SHA, "frames": [5], "settings": dict(TEST_SETTINGS), "regions": [[0, 4, 0, 4], [4, 8, 0, 4]],
            "outputs": ["check_0.png", "check_1.png"], **change}
    with pytest.raises(TaskFailure) as info:
        run(loop, EXECUTORS["verify"][1], context(rt, "verify", spec, tmp_path))
    assert info.value.retryable is False and words in str(info.value)


# ------------------------------------------------------------------ the cheater
def render_spec(frame: int, **settings) -> dict:
    return {"scene_sha256": SHA, "frames": [frame], "settings": {**TEST_SETTINGS, "format": "PNG",
                                                                 "color_depth": "8", **settings}}


def px(path: Path) -> np.ndarray:
    return rasters.read(path).planes[""]


@pytest.mark.parametrize("mode", MODES)
def test_each_cheat_keeps_name_and_size_but_not_the_pixels(loop, rt, honest, tmp_path, mode):
    cheater = Cheater(mode, seed=3)
    if mode == "copy":   # its first frame is honest, and remembered
        first = run(loop, cheater.render, context(rt, "render", render_spec(1), tmp_path / "t1" / "out", 1))
        assert np.array_equal(px(first[0].path), px(honest[1]))
    produced = run(loop, cheater.render, context(rt, "render", render_spec(2), tmp_path / "t2" / "out", 2))
    assert [(p.name, p.frame) for p in produced] == [("frame_0002.png", 2)]
    assert sorted(p.name for p in (tmp_path / "t2" / "out").iterdir() if p.is_file()) == ["frame_0002.png"]
    got, want = px(produced[0].path), px(honest[2])
    assert got.shape == want.shape == (48, 64, 4) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int)).max(-1) > 0
    print(f"\n{mode}: {diff.mean():.1%} of the pixels differ from the honest frame 2")
    assert diff.any()
    assert (got[..., 3] == 255).all() or mode in ("copy", "stale", "fewer_samples")
    if mode == "black":
        assert not got[..., :3].any()
    elif mode == "noise":
        assert diff.mean() > 0.95 and 100 < got[..., :3].mean() < 155
    elif mode == "copy":
        assert np.array_equal(got, px(honest[1]))
    elif mode == "stale":
        assert np.array_equal(got, px(honest[2 + STALE_OFFSET]))
    elif mode == "fewer_samples":
        assert np.array_equal(got, px(honest["2@1"]))
    elif mode == "painted":   # one flat rectangle of about 5 % of the frame; the rest is the honest render
        ys, xs = np.nonzero(diff)
        box = got[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert (box == [255, 0, 255, 255]).all() and 0.03 < box.shape[0] * box.shape[1] / diff.size < 0.07
        outside = np.ones_like(diff)
        outside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = False
        assert np.array_equal(got[outside], want[outside])


@pytest.mark.parametrize("mode", ["black", "noise", "painted"])
def test_cheats_keep_exr_tiles_in_format(loop, rt, tmp_path, mode):
    tile = {"cols": 2, "rows": 2, "col": 1, "row": 0, "overscan": None}
    spec = render_spec(3, format="EXR", color_depth="16", tile=tile)
    honest = run(loop, EXECUTORS["render"][1], context(rt, "render", spec, tmp_path / "honest"))
    produced = run(loop, Cheater(mode).render, context(rt, "render", spec, tmp_path / "cheat", 9))
    assert [p.name for p in produced] == [p.name for p in honest] == ["tile_0003_r0_c1.exr"]
    a, b = rasters.read(produced[0].path), rasters.read(honest[0].path)
    assert a.layout() == b.layout() and (a.width, a.height) == (b.width, b.height) == (32, 24)
    assert not same_bits(a, b) and (a.planes["A"] == 1).all()


def test_cheater_verifies_honestly_except_noise(loop, rt, honest, tmp_path):
    spec = {"scene_sha256": SHA, "frames": [5], "settings": {**TEST_SETTINGS, **FORMATS["png8"]},
            "regions": [[8, 24, 4, 16]], "outputs": ["check_0.png"]}
    full = rasters.read(honest["png8"]).crop(8, 24, 4, 16)
    for mode in MODES:
        c = Cheater(mode)
        executor = c.verify if mode == "noise" else c.honest_verify
        out = run(loop, executor, context(rt, "verify", spec, tmp_path / mode))
        assert same_bits(rasters.read(out[0].path), full) == (mode != "noise"), mode


def test_cheater_process_is_a_working_worker_that_tampers(farm, worker, tmp_path):
    f = farm()
    w = worker(f, "cheat1", cheat="painted", args=["--no-benchmark"])
    wait_workers(f.admin, 1)
    job = submit_sample(f.creator("alice"), "1-2")
    wait_for(lambda: w.log.read_text().count("cheater (painted): task") >= 2, 120,
             what="the cheater to tamper with both frames")
    text = w.log.read_text()
    assert "cheater: mode painted" in text and "frame_0001.png" in text and "frame_0002.png" in text
    assert "benchmark blender" not in text, "--no-benchmark went through"
    assert job["id"]


# ------------------------------------------------------------------ the benchmark
def start_daemon(loop, cache: Path, mode: str, models: list[Path] | None = None) -> tuple[WorkerDaemon, dict, float]:
    async def go():
        d = WorkerDaemon("tcp://127.0.0.1:9", cache, gpus="none", models=models or [], benchmark=mode)
        t0 = time.perf_counter()
        try:
            await d.start_runtimes()
            return d, d.capabilities(), time.perf_counter() - t0
        finally:
            await d.shutdown()
    return loop.run_until_complete(go())


def test_benchmark_is_measured_cached_and_forced(loop, tmp_path, monkeypatch):
    cache = tmp_path / "w"
    d1, caps1, t1 = start_daemon(loop, cache, "auto")
    b1 = caps1["benchmark"]
    assert set(b1) == {"blender", "measured_at", "key"} and b1["blender"] > 0
    assert "bpy=5.0.1" in b1["key"] and "gpus=none" in b1["key"] and "threads=" in b1["key"]
    stored = json.loads((cache / bench.CACHE_FILE).read_text())["entries"][b1["key"]]
    assert len(stored["runs"]) == W.BENCH_RUNS and stored["score"] == b1["blender"]
    assert stored["score"] == pytest.approx(L.BENCH_WORK_UNITS / min(stored["runs"]), rel=1e-3)
    print(f"\nbenchmark: renders {stored['runs']} s → {b1['blender']:.1f} work units/s; first start {t1:.2f} s")

    d2, caps2, t2 = start_daemon(loop, cache, "auto")        # same setup: the cached score, no render
    assert caps2["benchmark"] == b1
    d3, caps3, t3 = start_daemon(loop, cache, "force")       # farm worker --benchmark
    b3 = caps3["benchmark"]
    assert b3["key"] == b1["key"] and b3["measured_at"] > b1["measured_at"] and b3["blender"] > 0
    print(f"benchmark: start with the cached score {t2:.2f} s, re-measured {t3:.2f} s "
          f"({b3['blender']:.1f} work units/s)")
    assert t2 < t3
    d4, caps4, _ = start_daemon(loop, cache, "off")          # farm worker --no-benchmark
    assert d4.benchmark is None and "benchmark" not in caps4

    monkeypatch.setattr(W, "RENDER_THREADS", 1)              # another setup: another key, measured again
    _, caps5, _ = start_daemon(loop, cache, "auto")
    assert caps5["benchmark"]["key"] != b1["key"] and "threads=1" in caps5["benchmark"]["key"]
    assert len(json.loads((cache / bench.CACHE_FILE).read_text())["entries"]) == 2

    monkeypatch.setattr(bench, "SCENE", tmp_path / "missing.blend")   # no sample scene: no score, no failure
    d6, caps6, _ = start_daemon(loop, tmp_path / "w6", "auto")
    assert d6.benchmark is None and "benchmark" not in caps6


def test_benchmark_with_a_diffusion_model(loop, tmp_path, monkeypatch):
    subprocess.run([PY, "-m", "worker.runtimes.tiny_pipeline", "--out", str(tmp_path / "models" / "tiny-sd")], check=True,
                   capture_output=True, timeout=300)
    monkeypatch.setenv("RENDERHIVE_DIFFUSION_THREADS", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    d, caps, t = start_daemon(loop, tmp_path / "w", "auto", models=[tmp_path / "models"])
    b = caps["benchmark"]
    assert b["blender"] > 0 and b["diffusion"] > 0 and "model=" in b["key"] and "diffusion torch=" in b["key"]
    runs = json.loads((tmp_path / "w" / bench.CACHE_FILE).read_text())["entries"]
    print("\n" + "\n".join(f"{k.split()[0]}: runs {v['runs']} s → {v['score']:.1f} work units/s" for k, v in runs.items())
          + f"\nstart with both benchmarks {t:.1f} s")


def test_worker_flags_reuse_and_remeasure_the_score(farm, worker, tmp_path):
    f = farm()

    def start(args):
        w = worker(f, "wb", args=args)
        wait_for(lambda: w.log.exists() and w.log.read_text().count("connected to") > start.connects, 60,
                 what="the worker to connect")
        start.connects += 1
        w.stop()
        return w.log.read_text().splitlines()
    start.connects = 0
    lines = start([])
    assert [l for l in lines if "wb: benchmark blender" in l][-1].endswith("(measured)")
    lines = start([])
    assert sum("wb: benchmark blender" in l for l in lines) == 2
    assert [l for l in lines if "wb: benchmark blender" in l][-1].endswith("(cached)")
    lines = start(["--benchmark"])
    assert [l for l in lines if "wb: benchmark blender" in l][-1].endswith("(measured)")
    print("\n" + "\n".join(l for l in lines if "benchmark" in l))
