"""The probe render: how long a frame of a scene the farm has never rendered takes, measured before the
job is quoted (issue 23: "estimates that hold").

Without history for a scene (no accepted render task of the same scene and settings), the estimate of a
job — and so its deposit and ETA — was a configured guess (10 s a frame; the demo's 24 frames took a
deposit 30 × their cost). A probe measures it instead:

* **when**: a Blender job submitted through the API with no history for its scene and settings, on a farm
  that probes (:func:`farm_probes`: ``RENDERHIVE_PROBE`` = ``auto`` (default: when the farm takes
  payments), ``on`` or ``off``). The job starts ``probing`` (farm.store.states): none of its own tasks is
  leased, and the ledger takes no deposit (it opens settlements only for funding and later jobs);
* **what**: one task more, marked ``Task.probe`` on the coordinator only (index -1, never counted in the
  job's tasks, progress or work): the job's first frame, whole (no tile), at half its linear resolution
  and a quarter of its samples where the job pins them (``resolution_percent``/``resolution``,
  ``samples``; what the scene decides itself is rendered as the scene has it), no extra passes. Its spec
  is an ordinary render spec: the worker cannot tell it from a low-resolution job. It is leased ahead of
  normal work (:data:`PROBE_PRIORITY`) to the first free worker that may run the job (its tier included);
* **the measure** (:func:`per_unit`): the coordinator's own time ``T`` from the lease (a prefetched lease:
  from its first PROGRESS) to the RESULT, split by the worker's reported render seconds ``r`` (capped to
  ``0 ≤ r ≤ T``) into a fixed part ``T − r`` (inputs, scene load, upload: not scaled) and the render,
  scaled by pixels × samples: ``seconds a frame = (T − r) + r ÷ fraction``, ``fraction`` = probe pixels ×
  samples ÷ the job's; a unit (frame, or tile of a tiled job) is a frame ÷ tiles. A worker that lies
  about ``r`` moves the figure only within ``[T, T ÷ fraction]``; honest ones give the measured cost;
* **after**: the probe task is ``canceled`` (its output is discarded: no Output row, its hash is never
  told to anyone, so it can never be downloaded), the job's quote is re-made from the measure at the rate
  locked at submit (the :class:`Quoting` port, farm.payments.quotes) and the job goes on to ``funding``
  or ``queued``. A probe that fails for good fails the job with the worker's message, as a normal task
  would — and as for any task, a stranger's "not retryable" is retried on another worker first
  (farm.core's failure rules), so one hostile worker cannot fail a job by failing its probe;
* **who pays**: the job's deposit, like a spot check: its worker is paid the job's reference work per unit
  × ``fraction`` (farm.payments.pricing ``probe_work``), shown in the quote as ``probe_cost``.

Invariants: a job has at most one probe task, created with the job; a probe task is leased only while
its job is probing; nothing outside this module and the core's result/failure hooks reads ``Task.probe``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Protocol

from sqlmodel import Session, select

from farm.kinds.frames import frame_name, job_tiles, same_settings
from farm.store.models import Event, Job, Task
from farm.store.states import JobStatus, TaskStatus, transition

PROBE_PRIORITY = 101
"""Above any job's priority (-100..100) and its checks' (job + 1): the probe is leased before other work."""
LINEAR = 0.5
"""The probe's share of the job's pinned resolution, per side (a quarter of the pixels)."""
SAMPLES = 0.25
"""The probe's share of the job's pinned samples (at least one)."""
HISTORY_ROWS = 50
"""Accepted tasks of the scene looked at for ones with the job's settings."""
MODES = ("auto", "on", "off")


class Quoting(Protocol):
    """What the core needs from payments when a probe is measured (farm.payments.quotes.ProbeQuotes)."""

    def quote_probed(self, s: Session, job: Job, seconds_per_unit: float, basis: str) -> dict[str, Any]:
        """The job's quote re-made at its locked rate with ``seconds_per_unit`` (stored in ``job.spec``)."""


def mode() -> str:
    m = (os.environ.get("RENDERHIVE_PROBE") or "auto").strip().lower()
    if m not in MODES:
        raise ValueError(f"RENDERHIVE_PROBE={m!r}: use auto (probe when the farm takes payments), on or off")
    return m


def farm_probes(payments: bool) -> bool:
    """Whether this farm probes new scenes (module docstring): ``on``, or ``auto`` with payments on."""
    m = mode()
    return m == "on" or (m == "auto" and payments)


def has_history(s: Session, scene: str, settings: dict[str, Any] | None) -> bool:
    """Whether an accepted render task of ``scene`` with ``settings`` exists (what pricing's estimate uses)."""
    if not scene:
        return False
    rows = s.exec(select(Task.spec).join(Job, Job.id == Task.job_id)
                  .where(Job.spec["scene_sha256"].as_string() == scene)
                  .where(Task.status == TaskStatus.accepted.value).where(Task.kind == "render")
                  .where(Task.check_id.is_(None)).order_by(Task.id.desc()).limit(HISTORY_ROWS)).all()
    return any(same_settings((spec or {}).get("settings"), settings) for spec in rows)


def reduced(settings: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """(the probe's render settings, its fraction of the job frame's pixels × samples)."""
    out = {k: v for k, v in settings.items() if k not in ("tile", "region", "passes")}
    pixels = samples = 1.0
    if settings.get("resolution"):
        w, h = settings["resolution"]
        pw, ph = max(4, round(w * LINEAR)), max(4, round(h * LINEAR))
        out["resolution"] = [pw, ph]
        pixels = pw * ph / (w * h)
    elif settings.get("resolution_percent"):
        pct = int(settings["resolution_percent"])
        probe = max(1, round(pct * LINEAR))
        out["resolution_percent"] = probe
        pixels = (probe / pct) ** 2
    if settings.get("samples"):
        n = int(settings["samples"])
        probe_n = max(1, math.floor(n * SAMPLES))
        out["samples"] = probe_n
        samples = probe_n / n
    return out, pixels * samples


def wanted(s: Session, job: Job) -> bool:
    """Whether a newly stored job needs a probe: a Blender job with no history for its scene and settings."""
    return (job.kind == "blender" and "probe" not in job.spec
            and not has_history(s, job.spec.get("scene_sha256", ""), job.spec.get("settings")))


def start(s: Session, job: Job) -> Task | None:
    """Give a newly created job (queued or funding, its creation event in ``s``) its probe task and move it
    to probing; the status it goes on to once probed is kept in ``spec["probe"]["then"]``. None when the
    job has no render task to probe."""
    with s.no_autoflush:
        first = s.exec(select(Task).where(Task.job_id == job.id).where(Task.kind == "render")
                       .where(Task.probe.is_(False)).order_by(Task.index).limit(1)).first()
        if first is None or not first.spec.get("frames"):
            return None
        settings, fraction = reduced(first.spec.get("settings") or {})
        frame = int(first.spec["frames"][0])
        spec = {k: v for k, v in first.spec.items() if k not in ("frames", "settings", "outputs", "units", "final")}
        spec.update(frames=[frame], settings=settings, outputs=[frame_name(frame, settings.get("format", "PNG"))],
                    final=True, units=1)
        task = Task(job_id=job.id, index=-1, kind="render", priority=PROBE_PRIORITY, spec=spec,
                    inputs=list(first.inputs), progress_total=1, probe=True, status=TaskStatus.queued.value)
        s.add(task)
        created = [e for e in s.new if isinstance(e, Event) and e.kind == "job" and e.job_id == job.id and not e.old]
    s.flush()
    if not created:  # flushed already: the row of the job's creation event
        created = list(s.exec(select(Event).where(Event.job_id == job.id).where(Event.kind == "job")
                              .where(Event.old == "").order_by(Event.id).limit(1)))
    then = job.status
    for ev in created:
        ev.new = JobStatus.probing.value
        ev.detail = f"{ev.detail}; probing: one frame at low resolution measures the scene before the quote"
        s.add(ev)
    job.status = JobStatus.probing.value
    job.spec = {**job.spec, "probe": {"task_id": task.id, "frame": frame, "settings": settings,
                                      "fraction": round(fraction, 6), "tiles": job_tiles(job.spec), "then": then}}
    s.add(job)
    return task


def is_probe(task, job: Job | None) -> bool:
    """Whether ``task`` (a Task or the core's TaskRow) is ``job``'s probe (the job's spec names it)."""
    return job is not None and (job.spec.get("probe") or {}).get("task_id") == task.id


def per_unit(probe: dict[str, Any], seconds: float, render_seconds: float) -> tuple[float, float]:
    """(seconds a unit of the job, seconds a frame) from the probe's coordinator-timed ``seconds`` and its
    worker's reported ``render_seconds`` (module docstring)."""
    seconds = max(0.0, float(seconds))
    render = min(max(0.0, float(render_seconds)), seconds)
    fraction = min(1.0, max(1e-6, float(probe.get("fraction") or 1.0)))
    frame = (seconds - render) + render / fraction
    return frame / max(1, int(probe.get("tiles") or 1)), frame


def finish(s: Session, job: Job, task, seconds: float, render_seconds: float, worker_id: str, now: float,
           quoting: Quoting | None) -> None:
    """The probe's RESULT was stored (its task is ``done``): discard its output, record the measure, re-make
    the quote (``quoting``; without one the submit's quote stays) and let the job go on."""
    probe = dict(job.spec["probe"])
    unit, frame = per_unit(probe, seconds, render_seconds)
    transition(s, task, TaskStatus.canceled, reason="probe measured; its output is discarded",
               worker_id=worker_id, attempt=task.attempt, now=now)
    probe.update(seconds=round(seconds, 4), render_seconds=round(min(max(0.0, render_seconds), seconds), 4),
                 seconds_per_frame=round(frame, 4), seconds_per_unit=round(unit, 4), worker_id=worker_id,
                 attempt=task.attempt, at=now)
    job.spec = {**job.spec, "probe": probe}
    basis = f"probe render: one frame at {probe['fraction']:.3g} of its pixels × samples in {seconds:.2f} s"
    quote = quoting.quote_probed(s, job, unit, basis) if quoting is not None else job.spec.get("quote")
    s.add(job)
    then = probe.get("then") or JobStatus.queued.value
    cost = f", ≈ {quote['cost_tokens']} tokens, deposit {quote['deposit_tokens']}" if quote else ""
    transition(s, job, then, now=now, reason=f"probed: ≈ {unit:.3f} s a unit{cost}")


def fail(s: Session, job: Job, reason: str) -> str:
    """The job's reason when its probe failed for good (the core fails the job with it)."""
    return f"the probe render failed: {reason}"[:2000]
