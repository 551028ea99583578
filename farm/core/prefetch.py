"""Pipelined leases: the leases one connected worker holds, and how many more it may take.

A worker that says HELLO with the capability ``"prefetch": 1`` takes one lease more per slot than it
renders: while a slot renders task A, the next task B is already leased to it and its inputs fetched, so
the slot starts B the moment A's render ends (A's outputs upload meanwhile). :class:`Held` is the
coordinator's count of a connection's live leases, and the bound every READY is held to:

* a connection never holds more than ``slots × (1 + depth)`` leases, ``depth`` ≤ :data:`MAX_DEPTH`,
  whatever its READY asks (READY says how many *more* it wants; the room left is the ceiling);
* a prefetched lease is a lease like any other: fenced by (task, attempt), ended by cancel, expiry,
  disconnect or RELEASE like the one that renders, and counted until it ends;
* a lease is *waiting* from its grant until its first PROGRESS (its render began). A waiting lease shows
  no progress of its own, so :func:`carry` counts the worker's visible progress on its other leases as
  its own: while the worker renders, what waits behind the render is not stalled; a worker that stops
  progressing loses its waiting leases with the one it stalls on (they run out at the same time).

The set is in memory, changed with the coordinator's in-memory scheduling state (snapshot and restore
around a rolled-back step: :meth:`Held.copy`, :meth:`Held.restore`), and checked against the leases
themselves (:meth:`Held.prune`) whenever it would refuse a READY, so a lease end missed here costs one
lookup, never a slot.
"""
from __future__ import annotations

from typing import Any, Callable

MAX_DEPTH = 1
"""Leases a worker may hold beyond its slots, per slot: enough to hide the gap between two renders, and
no more (a hoarder claiming prefetch gets one extra lease a slot, which the progress watch still takes
back when its worker stops rendering)."""


def depth(capabilities: dict[str, Any]) -> int:
    """The prefetch depth a HELLO's capabilities ask for: ``"prefetch"`` an int, clamped to 0..MAX_DEPTH
    (anything else, or absent: 0, one lease a slot as before)."""
    v = capabilities.get("prefetch") if isinstance(capabilities, dict) else None
    return max(0, min(MAX_DEPTH, v)) if type(v) is int else 0


class Held:
    """The live leases of one connection: task id → attempt, and when each began rendering."""

    __slots__ = ("slots", "depth", "leases", "began")

    def __init__(self, slots: int, depth: int = 0):
        self.slots, self.depth = slots, depth
        self.leases: dict[int, int] = {}   # task id → attempt
        self.began: dict[int, float] = {}  # task id → its first PROGRESS (absent: still waiting)

    @property
    def capacity(self) -> int:
        return self.slots * (1 + self.depth)

    def room(self) -> int:
        """Leases it may still be given."""
        return max(0, self.capacity - len(self.leases))

    # Copy on write: a change replaces the (small: slots x (1 + depth) entries) dicts instead of changing
    # them, so that copy() is two references. The coordinator saves every connection's Held before each
    # step to undo a rolled-back one; copying the dicts cost ~1 ms a step at 1,000 connections
    # (bench/scale.py --idle).
    def add(self, task_id: int, attempt: int) -> None:
        self.leases = {**self.leases, task_id: attempt}
        if task_id in self.began:
            self.began = {t: b for t, b in self.began.items() if t != task_id}

    def end(self, task_id: int) -> None:
        if task_id in self.leases:
            self.leases = {t: a for t, a in self.leases.items() if t != task_id}
        if task_id in self.began:
            self.began = {t: b for t, b in self.began.items() if t != task_id}

    def start(self, task_id: int, now: float) -> bool:
        """Note the first PROGRESS of a held lease (its render began); True the first time."""
        if task_id in self.leases and task_id not in self.began:
            self.began = {**self.began, task_id: now}
            return True
        return False

    def waiting(self) -> list[tuple[int, int]]:
        """(task, attempt) of the leases granted and not begun (prefetched, queued at the worker)."""
        return [(t, a) for t, a in self.leases.items() if t not in self.began]

    def prune(self, holds: Callable[[int, int], bool]) -> None:
        """Forget the leases ``holds(task_id, attempt)`` says the connection no longer has."""
        for task_id, attempt in list(self.leases.items()):
            if not holds(task_id, attempt):
                self.end(task_id)

    def copy(self) -> tuple[dict[int, int], dict[int, float]]:
        return self.leases, self.began  # never changed in place (see add)

    def restore(self, saved: tuple[dict[int, int], dict[int, float]]) -> None:
        self.leases, self.began = saved


def carry(watch, held: Held, now: float) -> None:
    """A lease of ``held`` progressed: its waiting leases are not stalled either (see the module's
    docstring). ``watch``: the coordinator's :class:`farm.core.leases.ProgressWatch`."""
    for key in held.waiting():
        watch.last[key] = now
