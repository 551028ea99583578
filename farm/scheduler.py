"""Choosing which free worker gets the next task.

The coordinator asks :meth:`Scheduler.choose` once per task, in priority-then-FIFO task order, with the
free workers that may take it (capabilities fit, not blocklisted for the job). This is the seam for
reputation weighting: the default policy prefers a worker that has the task's diffusion model loaded (it
saves a model load), then data locality (a worker that already holds the task's input blobs downloads
nothing), then the worker with the most free slots, ties broken at random. :func:`fits` is the hard
filter: the runtime the task's kind needs, and the model hash a diffusion task names.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conn:
    """A connected worker as the broker sees it (in memory only; the Worker row is the durable part)."""
    identity: bytes
    worker_id: str
    slots: int
    capabilities: dict[str, Any]
    last_seen: float
    free: int = 0
    held_blobs: set[str] = field(default_factory=set)  # inputs it fetched or reported as cached
    models: set[str] = field(default_factory=set)      # hashes of the diffusion models it advertised
    loaded: list[str] = field(default_factory=list)    # model hashes it was last given tasks for, newest first

    def __post_init__(self) -> None:
        # tolerant on purpose: a malformed entry is ignored rather than stopping every assignment round
        ads = self.capabilities.get("models")
        self.models |= {m["hash"] for m in (ads if isinstance(ads, list) else [])
                        if isinstance(m, dict) and isinstance(m.get("hash"), str) and m["hash"] and not m.get("error")}

    def note_model(self, model_hash: str | None, keep: int = 2) -> None:
        """Remember that the worker now has ``model_hash`` loaded (its runtime keeps recent pipelines)."""
        if model_hash:
            self.loaded = [model_hash, *[h for h in self.loaded if h != model_hash]][:keep]


RUNTIME_FOR_KIND = {"render": "blender", "assemble": "assemble", "encode": "encode"}


def fits(task_kind: str, conn: Conn, spec: dict[str, Any] | None = None) -> bool:
    """Whether the worker's runtimes can run a task of this kind (and it holds the model the task names)."""
    runtime = RUNTIME_FOR_KIND.get(task_kind, task_kind)
    model = (spec or {}).get("model_hash")
    return runtime in conn.capabilities.get("runtimes", ["blender"]) and (not model or model in conn.models)


class Scheduler:
    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    def choose(self, task_inputs: list[str], candidates: list[Conn], model: str | None = None) -> Conn | None:
        if not candidates:
            return None
        inputs = set(task_inputs)

        def score(c: Conn) -> tuple[bool, int, int, float]:  # a loaded model saves a load: it comes first
            return (bool(model) and model in c.loaded, len(inputs & c.held_blobs), c.free, self.rng.random())

        return max(candidates, key=score)
