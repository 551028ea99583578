"""Choosing which free worker gets the next task.

The coordinator asks :meth:`Scheduler.choose` once per task, in priority-then-FIFO task order, with the
free workers that may take it (capabilities fit, tier high enough, not blocklisted for the job). The
choice is random, with probability proportional to reputation × speed (speed relative to the median of
the candidates; a worker with no benchmark counts as the median), times a cache-locality bonus for a worker
that already holds the task's inputs, mixed with an exploration floor: every candidate gets at least
EXPLORE / n of the probability, so a new or slow worker still gets work and is measured. A worker that
has the task's diffusion model loaded is preferred outright (a model load costs seconds to minutes).
:func:`fits` is the hard filter: the runtime the task's kind needs, the model hash a diffusion task
names, and the device memory it books (:mod:`farm.kinds.vram`: never a task to a worker it does not fit).
"""
from __future__ import annotations

import random
import statistics
from bisect import bisect
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from farm.core.prefetch import Held
from farm.core.prefetch import depth as prefetch_depth
from farm.kinds import vram


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
    granted: set[str] = field(default_factory=set)     # blobs it may fetch: inputs of leases it held
    uploading: set[str] = field(default_factory=set)   # blobs it began uploading and has not finished
    models: set[str] = field(default_factory=set)      # hashes of the diffusion models it advertised
    loaded: list[str] = field(default_factory=list)    # model hashes it was last given tasks for, newest first
    reputation: float = 0.5                            # copies of the Worker row's standing (farm/verify/reputation.py)
    tier: str = "new"  # a farm.verify.reputation.Tier value
    speed: float | None = None                         # work units a second; None: unknown
    speeds: dict[str, float | None] = field(default_factory=dict)  # the same, per runtime
    measured: bool = False                             # its speed is the coordinator's measure, not its claim
    held: Held | None = None                           # its live leases and their bound (farm/core/prefetch.py)
    memory: tuple[str, int] = ("cpu", 0)               # (device, bytes a task may use) it advertised (farm/kinds/vram.py)

    def __post_init__(self) -> None:
        if self.held is None:
            self.held = Held(self.slots, prefetch_depth(self.capabilities))
        self.memory = vram.worker_memory(self.capabilities)
        # tolerant on purpose: a malformed entry is ignored rather than stopping every assignment round
        ads = self.capabilities.get("models")
        self.models |= {m["hash"] for m in (ads if isinstance(ads, list) else [])
                        if isinstance(m, dict) and isinstance(m.get("hash"), str) and m["hash"] and not m.get("error")}

    def set_standing(self, w) -> None:
        """Copy reputation, tier and speed from the worker's row (after HELLO and every change)."""
        from farm.verify import reputation
        self.reputation, self.tier, self.speed = w.reputation, w.tier, reputation.speed(w)
        self.measured = w.speed_samples >= reputation.MIN_SPEED_SAMPLES and w.speed_measured > 0
        self.speeds = {rt: reputation.speed(w, rt) for rt in {*RUNTIME_FOR_KIND.values(), "diffusion"}}

    def note_model(self, model_hash: str | None, keep: int = 2) -> None:
        """Remember that the worker now has ``model_hash`` loaded (its runtime keeps recent pipelines)."""
        if model_hash:
            self.loaded = [model_hash, *[h for h in self.loaded if h != model_hash]][:keep]


UNMEASURED_SPEED_CAP = 2.0
"""A benchmark claim the coordinator has not measured yet weighs at most twice the :func:`yardstick`
(boasting 10⁸ work units a second must not win every task of a new job)."""


def yardstick(conns) -> float | None:
    """The speed unmeasured claims are held to: the median of the measured speeds, or with none measured
    yet the lowest claim (a flock of fresh ids boasting 10⁸ cannot move it up; claiming low only hurts
    the claimer). None when no speed is known."""
    measured = [c.speed for c in conns if c.speed and c.measured]
    if measured:
        return statistics.median(measured)
    claims = [c.speed for c in conns if c.speed]
    return min(claims) if claims else None


def claim_ratio(conn: Conn, stick: float | None) -> float:
    """How many times the :func:`yardstick` speed ``conn`` claims (1.0 when unknown, or measured)."""
    if conn.measured or not conn.speed or not stick:
        return 1.0
    return conn.speed / stick


RUNTIME_FOR_KIND = {"render": "blender", "assemble": "assemble", "encode": "encode", "verify": "blender"}


def fits(task_kind: str, conn: Conn, spec: dict[str, Any] | None = None) -> bool:
    """Whether the worker's runtimes can run a task of this kind (and it holds the model the task names and
    every other piece in its ``pieces``: LoRA hashes), and its advertised memory holds the task's
    ``memory_need``)."""
    runtime = RUNTIME_FOR_KIND.get(task_kind, task_kind)
    model = (spec or {}).get("model_hash")
    return (runtime in conn.capabilities.get("runtimes", ["blender"]) and (not model or model in conn.models)
            and all(h in conn.models for h in (spec or {}).get("pieces") or ())
            and (not model or vram.fits(spec.get("memory_need"), conn.memory)))


EXPLORE = 0.1
"""Share of the choice spread evenly over the candidates (the exploration floor)."""

LOCALITY_BONUS = 4.0
"""Weight multiplier of a worker that holds all of the task's inputs (pro rata for some of them): a scene
or model download can cost more than the render."""


class Scheduler:
    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    @staticmethod
    def weights(task_inputs: list[str], candidates: list[Conn]) -> list[float]:
        """The probability of each candidate (they sum to 1). (Called once per task leased: written for
        speed, the same arithmetic as the module docstring's.)"""
        speeds = [c.speed for c in candidates if c.speed]
        measured = [c.speed for c in candidates if c.speed and c.measured]
        ref = statistics.median(measured or speeds) if speeds else 1.0
        if not speeds:  # no benchmarks: every speed factor is 1
            raw = [c.reputation if c.reputation > 1e-3 else 1e-3 for c in candidates]
        else:  # a claim not measured yet counts for at most UNMEASURED_SPEED_CAP × the yardstick
            cap = yardstick(candidates) * UNMEASURED_SPEED_CAP
            raw = [(c.reputation if c.reputation > 1e-3 else 1e-3) * min(c.speed or ref, cap if not c.measured
                                                                          else float("inf")) / ref
                   for c in candidates]
        if task_inputs:
            inputs = set(task_inputs)
            k, bonus = len(inputs), LOCALITY_BONUS - 1
            if k == 1:  # one input (a scene, a model): held or not
                (x,) = inputs
                raw = [w * (1 + bonus) if x in c.held_blobs else w for w, c in zip(raw, candidates)]
            else:
                raw = [w * (1 + bonus * len(inputs.intersection(c.held_blobs)) / k) for w, c in zip(raw, candidates)]
        total, n = sum(raw), len(raw)
        scale, floor = (1 - EXPLORE) / total, EXPLORE / n
        return [x * scale + floor for x in raw]

    def choose(self, task_inputs: list[str], candidates: list[Conn], model: str | None = None) -> Conn | None:
        if not candidates:
            return None
        if model:  # a loaded model saves a load: those workers first
            candidates = [c for c in candidates if model in c.loaded] or candidates
        if len(candidates) == 1:
            return candidates[0]
        # random.choices(candidates, weights=...)[0], inlined: the same one draw and the same pick
        cum = list(accumulate(self.weights(task_inputs, candidates)))
        return candidates[bisect(cum, self.rng.random() * (cum[-1] + 0.0), 0, len(cum) - 1)]
