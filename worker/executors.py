"""What a worker does for each task kind. The daemon fetches inputs, calls the executor, uploads what it
produced and reports the result; an executor only turns input files into output files.

An executor is ``async fn(ctx) -> list[Produced]`` registered in :data:`EXECUTORS` under its task kind,
with the runtime child it needs (None for work done in the daemon's threads, e.g. stitching tiles).
Every produced file must carry one of the names in ``ctx.spec["outputs"]``: the coordinator accepts a
result only when the names match exactly.
"""
from __future__ import annotations

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

    def input_named(self, name: str) -> Path:
        """The local path of the dependency output called ``name`` (see spec["input_names"])."""
        return self.inputs[self.spec["input_names"][name]]


async def render(ctx: TaskContext) -> list[Produced]:
    """Frames of a Blender scene, rendered by the slot's long-lived Blender child."""
    spec = ctx.spec
    frames = list(spec.get("frames", []))
    rt = await ctx.runtime()
    request = {"op": "render", "scene": str(ctx.inputs[spec["scene_sha256"]]), "scene_key": spec["scene_sha256"],
               "frames": frames, "out_dir": str(ctx.out_dir), "settings": spec.get("settings", {})}
    produced, done = [], 0
    async for ev in rt.request(request):
        if ev.get("event") == "frame":
            done += 1
            ctx.progress(done, len(frames), f"frame {ev['frame']}")
        elif ev.get("event") == "error":
            raise TaskFailure(ev.get("message", "render failed"), bool(ev.get("retryable", False)))
        elif ev.get("event") == "done":
            produced = [Produced(Path(o["path"]).name, Path(o["path"]), int(o["frame"]), float(o.get("seconds", 0.0)))
                        for o in ev["outputs"]]
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
    "diffusion": ("diffusion", _lazy("worker.diffusion_tasks", "diffusion")),
    "contact_sheet": (None, _lazy("worker.diffusion_tasks", "contact_sheet")),
    "assemble": (None, _lazy("worker.assemble", "assemble")),   # a frame from its tiles
    "encode": (None, _lazy("worker.assemble", "encode")),       # video.mp4 from the frames
}
"""Task kind → (runtime child it needs, executor)."""

RUNTIMES: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "blender": ("worker.blender_runtime", lambda gpus: ["--gpus", gpus]),
    "diffusion": ("worker.diffusion_runtime", lambda gpus: ["--gpus", gpus]),
}
"""Runtime name → (module run as ``python -m``, its arguments given the slot's ``--gpus`` value)."""
