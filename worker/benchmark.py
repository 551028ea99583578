"""The worker's benchmark score: how fast it does a fixed piece of work, in work units a second.

Like OctaneBench: the Blender score is ``BENCH_WORK_UNITS`` ÷ the seconds it takes to render frame
``BENCH_FRAME`` of ``sample_scenes/turntable.blend`` at ``BENCH_BLENDER_SETTINGS`` (the fastest of
``BENCH_RUNS`` renders); the diffusion score is the same for one fixed tiny generation
(``BENCH_DIFFUSION``) with the first model the worker holds. The coordinator weighs scheduling by the
score, and work is metered in its units.

Invariants:

* measured in the worker's own runtime children (slot 0), the processes that will do the work, so the
  score sees the same devices, threads and library versions, and no extra process is started;
* a score is cached in ``<cache_dir>/benchmark.json`` under a key of everything that sets the speed
  (runtime, library versions, devices and ``--gpus``, thread settings, the benchmark's scene or model and
  settings), and reused while the key matches: a restart costs no render. ``force`` re-measures;
* a benchmark that fails or times out is logged and leaves that score out; it never stops the worker.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common import limits as L
from common import model_folders
from worker import sandbox as sandboxing
from worker import settings as C

log = logging.getLogger("worker.benchmark")

CACHE_FILE = "benchmark.json"
SCENE = Path(__file__).resolve().parents[1] / "sample_scenes" / "turntable.blend"
MODES = ("auto", "force", "off")
"""auto: reuse a cached score whose key matches, else measure; force: always measure; off: no score."""


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def blender_key(ready: dict, gpus: str, scene: Path = SCENE) -> str:
    """Cache key of the Blender score, from the runtime child's ready event and its ``--gpus``."""
    devices = ",".join(f"{d.get('type')}:{d.get('name')}" for d in ready.get("devices", []))
    return (f"blender bpy={ready.get('bpy_version')} devices={devices} gpus={gpus} "
            f"threads={C.RENDER_THREADS} scene={_sha12(scene)} frame={C.BENCH_FRAME} "
            f"settings={json.dumps(C.BENCH_BLENDER_SETTINGS, sort_keys=True)}")


def diffusion_key(ready: dict, gpus: str, model_hash: str) -> str:
    """Cache key of the diffusion score, from the diffusion child's ready event and the model."""
    devices = ",".join(f"{d.get('type')}:{d.get('name', d.get('id'))}" for d in ready.get("devices", []))
    return (f"diffusion torch={ready.get('torch')} diffusers={ready.get('diffusers')} device={ready.get('device')}"
            f" dtype={ready.get('dtype')} devices={devices} gpus={gpus} threads={C.DIFFUSION_THREADS} "
            f"model={model_hash[:12]} settings={json.dumps(C.BENCH_DIFFUSION, sort_keys=True)}")


async def _request(rt, payload: dict) -> dict:
    """The terminal event of one request; an "error" event raises RuntimeError."""
    last: dict = {}
    async for ev in rt.request(payload):
        last = ev
    if last.get("event") != "done":
        raise RuntimeError(last.get("message") or f"unexpected reply {last!r}")
    return last


async def measure_blender(rt, work: Path, scene: Path = SCENE) -> dict[str, Any]:
    """Render the benchmark frame BENCH_RUNS times in the Blender child ``rt``: the seconds of each
    render and the score of the fastest."""
    runs = []
    for i in range(C.BENCH_RUNS):
        done = await _request(rt, {"op": "render", "scene": str(scene), "scene_key": f"benchmark:{_sha12(scene)}",
                                   "frames": [C.BENCH_FRAME], "out_dir": str(work / f"blender{i}"),
                                   "settings": dict(C.BENCH_BLENDER_SETTINGS)})
        runs.append(float(done["outputs"][0]["seconds"]))
    return {"score": round(L.BENCH_WORK_UNITS / min(runs), 3), "seconds": min(runs), "runs": runs}


async def measure_diffusion(rt, work: Path, model_path: Path, model_name: str, model_hash: str) -> dict[str, Any]:
    """Generate the benchmark image BENCH_RUNS times in the diffusion child ``rt`` (the first also loads
    the model): the seconds of each and the score of the fastest."""
    b = C.BENCH_DIFFUSION
    runs = []
    for i in range(C.BENCH_RUNS):
        done = await _request(rt, {
            "op": "generate", "model_path": str(model_path), "model_name": model_name, "model_hash": model_hash,
            "mode": "txt2img", "steps": b["steps"], "guidance": b["guidance"], "width": b["width"],
            "height": b["height"], "scheduler": "default", "strength": None, "out_dir": str(work / f"diffusion{i}"),
            "images": [{"name": "benchmark.png", "index": 0, "seed": b["seed"], "prompt": b["prompt"],
                        "negative": ""}]})
        runs.append(float(done["outputs"][0]["seconds"]))
    return {"score": round(L.BENCH_WORK_UNITS / max(min(runs), 1e-6), 3), "seconds": min(runs), "runs": runs}


def load_cache(cache_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((Path(cache_dir) / CACHE_FILE).read_text())
        return {k: v for k, v in data.get("entries", {}).items() if isinstance(v, dict) and "score" in v}
    except (OSError, ValueError, AttributeError):
        return {}


def save_cache(cache_dir: Path, entries: dict[str, dict]) -> None:
    path = Path(cache_dir) / CACHE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=1, sort_keys=True))
    os.replace(tmp, path)                   # never a half-written cache


async def scores(cache_dir: Path, mode: str, jobs: dict[str, tuple[str, Any]]) -> dict[str, Any] | None:
    """The worker's ``capabilities["benchmark"]``, or None (mode off, or nothing measured).

    ``jobs``: runtime name → (cache key, zero-argument coroutine function that measures it). A cached
    entry with the same key is reused unless ``mode`` is "force"; a measurement that fails is logged and
    left out. Returns {name: score, ..., "measured_at": oldest measurement, "key": the keys joined}.
    """
    if mode not in MODES:
        raise ValueError(f"benchmark mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    cache = load_cache(cache_dir)
    found: dict[str, tuple[str, dict]] = {}
    changed = False
    for name, (key, measure) in jobs.items():
        entry = cache.get(key) if mode == "auto" else None
        if entry is None:
            try:
                async with asyncio.timeout(C.BENCH_TIMEOUT):
                    entry = {**await measure(), "measured_at": round(time.time(), 3)}
            except Exception as exc:        # RuntimeCrashed, a timeout, an error event: no score, keep going
                log.warning("benchmark of %s failed, reporting no %s score: %s", name, name, exc)
                continue
            cache[key] = entry
            changed = True
            log.info("benchmark %s: %.3f s (runs %s) → %.1f work units/s", name, entry["seconds"],
                     entry.get("runs"), entry["score"])
        found[name] = (key, entry)
    if changed:
        try:
            save_cache(cache_dir, cache)
        except OSError as exc:
            log.warning("cannot write the benchmark cache: %s", exc)
    if not found:
        return None
    return {**{name: float(e["score"]) for name, (_k, e) in found.items()},
            "measured_at": min(float(e["measured_at"]) for _k, e in found.values()),
            "key": " | ".join(k for k, _e in found.values())}


async def _killing_on_failure(daemon, name: str, measure) -> dict[str, Any]:
    """Run ``measure(runtime child)``; a child left mid-request (timeout, error) is killed, and the daemon
    starts a fresh one for its first task."""
    rt = await daemon._runtime(0, name)
    try:
        return await measure(rt)
    except BaseException:
        await rt.kill()
        raise


async def measure_worker(daemon, mode: str) -> dict[str, Any] | None:
    """The benchmark of a :class:`worker.daemon.WorkerDaemon` whose runtimes have started: Blender (if the
    sample scene is there) and diffusion (if it holds a usable model), in slot 0's children."""
    if mode == "off":
        return None
    works = []  # the folders the measurements write in (inside each sandboxed child's own folder)

    def workdir(name: str) -> Path:
        d = daemon.task_dir(name, 0, "benchmark")
        d.mkdir(parents=True, exist_ok=True)
        if (policy := daemon.policy(name, 0)) is not None:
            sandboxing.give(policy, d)
        works.append(d)
        return d
    jobs: dict[str, tuple[str, Any]] = {}
    blender = daemon.runtimes.get(("blender", 0))
    if not SCENE.is_file():
        log.warning("no %s: reporting no blender benchmark score", SCENE)
    elif blender is not None and blender.alive:
        async def run_blender():
            name = f"benchmark-{_sha12(SCENE)}.blend"  # named by content, like a task's input
            scene = daemon.stage("blender", 0, {name: SCENE})[name]
            return await _killing_on_failure(daemon, "blender", lambda rt: measure_blender(rt, workdir("blender"),
                                                                                        scene))
        jobs["blender"] = (blender_key(blender.ready or {}, daemon.gpu_args[0]), run_blender)
    # a text-to-image pipeline: a LoRA file is no model, and an inpainting model needs an image and a mask
    model = next((m for m in daemon.models if m.ok and m.kind == "pipeline" and not model_folders.inpainting(m.path)),
                 None)
    diffusion = daemon.runtimes.get(("diffusion", 0))
    if model is not None and diffusion is not None and diffusion.alive:
        async def run_diffusion():
            return await _killing_on_failure(daemon, "diffusion", lambda rt: measure_diffusion(
                rt, workdir("diffusion"), model.path, model.name, model.hash))
        jobs["diffusion"] = (diffusion_key(diffusion.ready or {}, daemon.gpu_args[0], model.hash), run_diffusion)
    try:
        return await scores(daemon.dir, mode, jobs)
    finally:
        for d in works:
            shutil.rmtree(d, ignore_errors=True)
