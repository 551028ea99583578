"""Pipelined tasks on a worker: which slot a new lease waits on, and whose turn it is in a slot's runtime.

With prefetch depth 1 (:data:`worker.settings.PREFETCH_DEPTH`, HELLO capability ``prefetch``) a slot
holds one task more than it renders: while task A renders in the slot's runtime child, the next task B
is already leased and fetches its inputs; the moment A's render ends B's render starts, and A's outputs
are hashed and uploaded (then RESULT) while B renders. A task goes through three phases:

    waiting (inputs fetched, the slot busy) → rendering (the slot's turn) → uploading (until RESULT)

Invariants:

* one task at a time renders in a slot's runtime child: :meth:`Pipeline.turn` holds the slot's lock
  (asyncio locks wake waiters in FIFO order, so tasks render in the order they were leased);
* a new lease goes to a slot with fewer than ``1 + depth`` tasks waiting or rendering (:meth:`place`);
* the worker asks (READY) for ``capacity − tasks held``, every task counted until its RESULT/FAILED is
  sent: the same count the coordinator bounds (``farm/core/prefetch.py``), so READY never asks for a lease
  the coordinator would refuse;
* a task cancelled while waiting or uploading never touches the slot's runtime child (the next task may be
  rendering in it); one cancelled while rendering has the child killed *before* the slot's turn passes,
  so the next task never meets a child that is being killed;
* a finished render's outputs leave the runtime child's writable folder before the turn passes
  (:func:`take_outputs`): the next task's scene, rendering meanwhile in the same child, cannot touch
  another task's results before they are hashed and uploaded.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

WAITING, RENDERING, UPLOADING = "waiting", "rendering", "uploading"

PHASES_FILE = os.environ.get("RENDERHIVE_PHASES", "")
"""Where the daemon appends one JSON line per phase of each task (bench/overhead.py --phases); off when
empty. A line is {task, attempt, phase, at (wall clock)}; ``rendered`` lines carry the runtime's marks."""


def mark(task_id: int, attempt: int, phase: str, **extra: Any) -> None:
    """Record that task (task_id, attempt) reached ``phase`` now (only with RENDERHIVE_PHASES set)."""
    if PHASES_FILE:
        with open(PHASES_FILE, "a") as f:  # one short append a phase: a few µs, and only when measuring
            f.write(json.dumps({"task": task_id, "attempt": attempt, "phase": phase, "at": time.time(),
                                **extra}) + "\n")


class Pipeline:
    """Slots, their turns, and how many tasks the worker may hold."""

    def __init__(self, slots: int, depth: int = 1):
        self.slots = slots
        self.depth = max(0, min(1, int(depth)))  # the coordinator holds a worker to 1 per slot at most
        self.locks = [asyncio.Lock() for _ in range(slots)]

    @property
    def capacity(self) -> int:
        """Tasks the worker may hold at once (rendering, waiting and uploading)."""
        return self.slots * (1 + self.depth)

    def free(self, held: int) -> int:
        """READY's count: leases wanted with ``held`` tasks not yet reported."""
        return max(0, self.capacity - held)

    def place(self, running: Iterable[Any]) -> int | None:
        """The slot for a new task (an idle one first), or None when every slot is full. ``running``:
        the tasks held, each with ``slot`` and ``phase``."""
        busy = Counter(r.slot for r in running if r.phase != UPLOADING)
        slot = min(range(self.slots), key=lambda i: busy[i])
        return slot if busy[slot] < 1 + self.depth else None

    @contextlib.asynccontextmanager
    async def turn(self, run: Any, kill: Callable[[], Awaitable[None]]):
        """The slot's runtime child for ``run`` (waits for the task before it). Cancelled inside,
        ``kill()`` stops the child while the turn is still held."""
        async with self.locks[run.slot]:
            run.phase = RENDERING
            try:
                yield
            except asyncio.CancelledError:
                await kill()
                raise
            finally:
                run.phase = UPLOADING


def take_outputs(produced: list, out_dir: Path, dest: Path) -> list:
    """Move a finished render's folder ``out_dir`` to ``dest`` (a folder only the daemon writes) and
    return ``produced`` (items with a ``path`` inside ``out_dir``) with their paths there. A rename: no
    byte is copied while the slot waits."""
    if dest == out_dir or not out_dir.exists():
        return produced
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out_dir, dest)
    for p in produced:
        with contextlib.suppress(ValueError):
            p.path = dest / Path(p.path).relative_to(out_dir)
    return produced
