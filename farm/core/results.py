"""What a RESULT must be, and what an accepted task sets free.

* :func:`check_outputs`: a result names exactly the task's expected outputs, each uploaded, with
  well-typed fields; anything else is refused before a row is written (a malformed list would make the
  Output rows raise, and the RESULT would never be answered).
* :class:`Dependents`: the tasks that wait for others (a tile job's assemble, a video's encode) are
  queued once everything they wait for is accepted, with those tasks' outputs as their inputs
  (``spec["input_names"]`` maps output names to blob hashes). A job's dependencies are stored with it and
  never change, so which of its tasks others wait for is read once per job and kept.
"""
from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from farm.store.blobs import BlobError, BlobStore
from farm.store.models import Output, Task, TaskDep
from farm.store.states import TaskStatus, transition


def check_outputs(blobs: BlobStore, task: Task, outputs: list[dict[str, Any]],
                  sizes: dict[str, int] | None = None) -> str:
    """Why ``outputs`` is not a valid result of ``task`` ("" when it is). ``sizes``: filled with the
    sizes of the uploaded outputs."""
    want = sorted(task.spec.get("outputs", []))
    for o in outputs:
        if (not isinstance(o.get("name"), str) or type(o.get("frame", 0)) is not int
                or type(o.get("seconds", 0.0)) not in (int, float) or not isinstance(o.get("sha256"), str)):
            return f"malformed outputs list (name and sha256 strings, frame an integer, seconds a number): {o!r:.200}"
    got = sorted(o["name"] for o in outputs)
    if got != want:
        return f"outputs are {got}, the task asked for {want}"
    for o in outputs:
        try:
            size = blobs.file_size(o["sha256"])
            if size is None:
                return f"output {o['name']} was not uploaded (BLOB_PUT it before RESULT)"
            if sizes is not None:
                sizes[o["sha256"]] = size
        except BlobError as exc:
            return f"output {o['name']}: {exc}"
    return ""


class Dependents:
    """Releases waiting tasks when what they wait for is accepted (coordinator thread only)."""

    MAX_JOBS = 10_000  # jobs whose dependency sets are kept; past it the cache starts again

    def __init__(self) -> None:
        self._needed: dict[int, frozenset[int]] = {}  # job id → ids of its tasks that other tasks wait for

    def forget(self, job_id: int) -> None:
        self._needed.pop(job_id, None)

    def release(self, s: Session, task: Task, now: float) -> bool:
        """Queue the tasks that waited for ``task`` and now have all they need; whether any was queued."""
        needed = self._needed.get(task.job_id)
        if needed is None:
            if len(self._needed) > self.MAX_JOBS:
                self._needed.clear()
            needed = self._needed[task.job_id] = frozenset(s.exec(
                select(TaskDep.needs_id).join(Task, Task.id == TaskDep.needs_id).where(Task.job_id == task.job_id)))
        if task.id not in needed:
            return False
        queued = False
        for dep in s.exec(select(TaskDep).where(TaskDep.needs_id == task.id)).all():
            waiting = s.get(Task, dep.task_id)
            if waiting is None or waiting.status != TaskStatus.waiting.value:
                continue
            needs = s.exec(select(TaskDep.needs_id).where(TaskDep.task_id == waiting.id)).all()
            if any(s.get(Task, n).status != TaskStatus.accepted.value for n in needs):
                continue
            outs = s.exec(select(Output).where(Output.task_id.in_(needs)).order_by(Output.frame, Output.name)).all()
            waiting.inputs = list(dict.fromkeys([*waiting.inputs, *(o.sha256 for o in outs)]))
            waiting.spec = {**waiting.spec, "input_names": {o.name: o.sha256 for o in outs}}
            transition(s, waiting, TaskStatus.queued, reason="every task it waits for is accepted", now=now)
            queued = True
        return queued
