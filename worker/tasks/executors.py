"""What a worker does for each task kind. The daemon fetches inputs, calls the executor, uploads what it
produced and reports the result; an executor only turns input files into output files.

An executor is ``async fn(ctx) -> list[Produced]`` registered in :data:`EXECUTORS` under its task kind,
with the runtime child it needs (None for work done in the daemon's threads, e.g. stitching tiles).
Every produced file must carry one of the names in ``ctx.spec["outputs"]``: the coordinator accepts a
result only when the names match exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable


class TaskFailure(Exception):
    """The task cannot be done; ``retryable`` is False when another worker would fail the same way."""

    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.retryable = retryable


@dataclass
class Produced:
    name: str
    path: Path
    frame: int = 0
    seconds: float = 0.0


@dataclass
class TaskContext:
    task_id: int
    attempt: int
    kind: str
    spec: dict[str, Any]
    inputs: dict[str, Path]            # blob sha256 → local cached path
    out_dir: Path
    progress: Callable[[int, int, str], None]
    runtime: Callable[[], Awaitable[Any]]  # the slot's runtime child for this kind (started on demand)
    models: dict[str, Path] = field(default_factory=dict)  # diffusion models this worker holds: hash → folder
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # run by close(): a laid-out project

    def close(self) -> None:
        while self.cleanup:
            self.cleanup.pop()()

    def input_named(self, name: str) -> Path:
        """The local path of the dependency output called ``name`` (see spec["input_names"])."""
        return self.inputs[self.spec["input_names"][name]]


async def _blender(ctx: TaskContext, request: dict, on_frame: Callable[[dict], None]) -> list[dict]:
    """Run one render request in the slot's Blender child; its outputs ({frame, path, seconds})."""
    rt = await ctx.runtime()
    outputs: list[dict] = []
    async for ev in rt.request(request):
        if ev.get("event") == "frame":
            on_frame(ev)
        elif ev.get("event") == "error":
            raise TaskFailure(ev.get("message", "render failed"), bool(ev.get("retryable", False)))
        elif ev.get("event") == "done":
            outputs = ev["outputs"]
    return outputs


def _scene(ctx: TaskContext) -> dict:
    """The scene part of a render request: the single .blend, or the project's tree laid out for it."""
    spec = ctx.spec
    project = spec.get("project")
    if not project:
        return {"scene": str(ctx.inputs[spec["scene_sha256"]]), "scene_key": spec["scene_sha256"]}
    from worker.tasks import project as layout
    msha = project.get("manifest_sha256") if isinstance(project, dict) else None
    if msha not in ctx.inputs:
        raise TaskFailure("the task's project manifest is not among its inputs", False)
    staged = Path(ctx.inputs[msha])
    # Inside the sandbox the inputs are the slot's own read-only folder: a stable path per project, so the
    # loaded scene is kept between tasks. Unsandboxed they are the blob cache, shared: one tree per task.
    name = f"project-{msha[:16]}" + ("" if staged.parent.name == "inputs" else f"-{ctx.task_id}-{ctx.attempt}")
    root = Path(os.path.realpath(staged.parent)) / name
    layout.remove(root)
    try:
        scene = layout.lay_out(root, layout.read_manifest(staged), ctx.inputs)
    except layout.LayoutError as exc:
        layout.remove(root)
        raise TaskFailure(str(exc), False) from None
    ctx.cleanup.append(lambda: layout.remove(root))
    return {"scene": str(scene), "scene_key": msha, "project_root": str(root),
            "allow_missing": bool(spec.get("allow_missing"))}


async def render(ctx: TaskContext) -> list[Produced]:
    """Frames of a Blender scene, rendered by the slot's long-lived Blender child."""
    spec = ctx.spec
    frames = list(spec.get("frames", []))
    request = {"op": "render", **_scene(ctx), "frames": frames, "out_dir": str(ctx.out_dir),
               "settings": spec.get("settings", {})}
    done = 0

    def on_frame(ev: dict) -> None:
        nonlocal done
        done += 1
        if done < len(frames):  # the last frame's RESULT follows (hash, upload): its PROGRESS would be one more
            ctx.progress(done, len(frames), f"frame {ev['frame']}")  # commit, sent while the next task waits
    try:
        outputs = await _blender(ctx, request, on_frame)
    finally:
        ctx.close()
    return [Produced(Path(o["path"]).name, Path(o["path"]), int(o["frame"]), float(o.get("seconds", 0.0)))
            for o in outputs]


async def verify(ctx: TaskContext) -> list[Produced]:
    """Re-render regions of one frame (or the whole frame) of another worker's result, for a spot check.

    spec: {"scene_sha256", "frames": [f], "settings": the checked task's settings (no "tile"),
    "regions": [[x0, x1, y0, y1], ...] (output pixels, origin top-left, ends exclusive; [] = the whole
    frame), "outputs": one file name per region (one for the whole frame), ".exr" for EXR settings}.
    Each region is rendered exactly as the same rectangle of a full render (see worker.runtimes.blender)
    and returned under its name in ``outputs``, with its own render seconds.
    """
    spec = ctx.spec
    frames, settings = spec.get("frames"), dict(spec.get("settings") or {})
    regions, names = spec.get("regions") or [], list(spec.get("outputs") or [])
    if not isinstance(frames, list) or len(frames) != 1 or type(frames[0]) is not int:
        raise TaskFailure(f"a verify task checks exactly one frame, got frames={frames!r}", False)
    if settings.get("tile") is not None or settings.get("region") is not None:
        raise TaskFailure("a verify task's settings must not carry a tile or region: give rectangles of the "
                          "whole frame in 'regions'", False)
    parts = list(regions) or [None]
    ext = ".exr" if settings.get("format") == "EXR" else ".png"
    if len(names) != len(parts) or any(Path(n).name != n or Path(n).suffix != ext for n in names):
        raise TaskFailure(f"a verify task needs one plain {ext} file name in 'outputs' per region "
                          f"({len(parts)}), got {names!r}", False)
    frame = frames[0]
    scratch = ctx.out_dir / ".verify"          # the runtime's own names never clash with the outputs
    produced = []
    scene = _scene(ctx)
    try:
        for i, (region, name) in enumerate(zip(parts, names)):
            part = settings if region is None else {**settings, "region": region}
            request = {"op": "render", **scene, "frames": [frame], "out_dir": str(scratch / str(i)),
                       "settings": part}
            (out,) = await _blender(ctx, request, lambda ev: None)
            dst = ctx.out_dir / name
            Path(out["path"]).replace(dst)
            produced.append(Produced(name, dst, frame, float(out.get("seconds", 0.0))))
            ctx.progress(i + 1, len(parts), f"frame {frame} " + (f"region {region}" if region else "whole"))
    finally:
        ctx.close()
    return produced


Executor = Callable[[TaskContext], Awaitable[list[Produced]]]


def _lazy(module: str, name: str) -> Executor:
    """An executor defined in ``module``, imported on first use (modules that import this one stay
    importable in any order, and the daemon loads only what it runs)."""
    async def run(ctx: TaskContext) -> list[Produced]:
        import importlib
        return await getattr(importlib.import_module(module), name)(ctx)
    return run


EXECUTORS: dict[str, tuple[str | None, Executor]] = {
    "render": ("blender", render),
    "verify": ("blender", verify),      # regions of another worker's frame, re-rendered for a spot check
    "diffusion": ("diffusion", _lazy("worker.tasks.diffusion", "diffusion")),
    "contact_sheet": (None, _lazy("worker.tasks.diffusion", "contact_sheet")),
    "assemble": (None, _lazy("worker.tasks.assemble", "assemble")),   # a frame from its tiles
    "encode": (None, _lazy("worker.tasks.assemble", "encode")),       # video.mp4 from the frames
}
"""Task kind → (runtime child it needs, executor)."""

RUNTIMES: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "blender": ("worker.runtimes.blender", lambda gpus: ["--gpus", gpus]),
    "diffusion": ("worker.runtimes.diffusion", lambda gpus: ["--gpus", gpus]),
}
"""Runtime name → (module run as ``python -m``, its arguments given the slot's ``--gpus`` value)."""
