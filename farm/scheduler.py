"""Choosing which free worker gets the next task.

The coordinator asks :meth:`Scheduler.choose` once per task, in priority-then-FIFO task order, with the
free workers that may take it (capabilities fit, not blocklisted for the job). This is the seam for
reputation weighting: the default policy prefers data locality (a worker that already holds the task's
input blobs downloads nothing), then the worker with the most free slots, ties broken at random.
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


RUNTIME_FOR_KIND = {"render": "blender"}


def fits(task_kind: str, conn: Conn) -> bool:
    """Whether the worker's runtimes can run a task of this kind."""
    runtime = RUNTIME_FOR_KIND.get(task_kind, task_kind)
    return runtime in conn.capabilities.get("runtimes", ["blender"])


class Scheduler:
    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    def choose(self, task_inputs: list[str], candidates: list[Conn]) -> Conn | None:
        if not candidates:
            return None
        inputs = set(task_inputs)

        def score(c: Conn) -> tuple[int, int, float]:
            return (len(inputs & c.held_blobs), c.free, self.rng.random())

        return max(candidates, key=score)
