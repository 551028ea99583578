"""Verified results: cheap checks on every result, spot checks by a different worker, and what follows.

The coordinator calls :meth:`Verifier.on_result` when a task's RESULT is stored. The result is inspected
(readable, sane size; a flat image or a byte-copy of another output is suspicious); then, with the
probability of the worker's tier (every result of a new worker, 10 % of a trusted one's), or always
when suspicious, the task goes to ``verifying`` and a check task is queued for a *different* worker:

* ``full``: the whole frame re-rendered (new workers: crops would miss a small region painted over);
* ``crops``: CHECK_CROPS random regions of CHECK_CROP_FRACTION of the frame (trusted workers);
* a tile, or a diffusion image, is re-made whole with the same settings and seed.

:meth:`on_check_result` compares the re-render with the result (:mod:`farm.verify.compare`: equal pixels between
like devices, SSIM across device types). A pass accepts the task and adds good evidence to the worker's
reputation. A mismatch with a verifier
that is not trusted yet is settled by a third worker (``tiebreak``): the two that agree win. A failed
check voids the task (its outputs are dropped, it is re-rendered by someone else and never paid), cuts the
worker's reputation hard, re-checks its other results in the job, and blocklists it for the job after
CHECK_BLOCKLIST_AFTER failures. Workers on probation get no work, only ``probe`` checks: a re-render of a
result already accepted, compared with it. Every decision is a job event and a reputation event.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from common import rasters
from common.limits import is_pass_output
from common.logs import ctx
from farm import constants as C
from farm.store.models import Attempt, Check, Event, Job, JobWorker, Output, Task, TaskDep, Worker
from farm.store.states import TASK_LEASED, CheckStatus, TaskStatus, transition
from farm.verify import compare
from farm.verify import reputation as R
from farm.verify.port import Core, Seat
from farm.verify.reputation import Tier

log = logging.getLogger("farm.verify.verifier")

PRIVATE_SPEC = ("check_id", "exclude", "only_worker")
"""Spec keys the coordinator keeps to itself: a worker is never told that a task is a check. Probes and
re-renders of tiles or images look exactly like the job's own tasks; only region checks have a kind of
their own ("verify"), and those check other workers' results, never the worker's own."""

PICTURES = (".png", ".exr")


def is_check(task: Task) -> bool:
    """Check tasks live in the checked job (their events are the job's) but are not its work: not counted
    in its tasks, progress or price, and paid by no one (``Task.check_id`` marks them)."""
    return task.check_id is not None


def public_spec(spec: dict) -> dict:
    """The spec as sent to a worker."""
    return {k: v for k, v in spec.items() if k not in PRIVATE_SPEC}


class Verifier:
    def __init__(self, core: Core, enabled: bool = True, seed: int | None = None):
        self.core = core
        self.enabled = enabled
        self.rng = random.Random(seed)
        self.probe_after: dict[str, float] = {}   # worker id → earliest time of its next probe
        self.probe_backoff: dict[str, float] = {}

    # ------------------------------------------------------------------ results of job tasks
    def inspect(self, s: Session, task: Task, outputs: list[dict[str, Any]]) -> tuple[str, str]:
        """Cheap checks of a RESULT's pictures before it is stored: (why it is invalid, why it is suspicious)."""
        if not self.enabled or task.kind not in ("render", "diffusion"):
            return "", ""
        suspicious = ""
        bound = compare.size_bound(task.kind, task.spec)  # refused from its header past the task's size
        for o in outputs:
            if Path(o["name"]).suffix.lower() not in PICTURES:
                continue
            found = compare.inspect(self.core.blobs.path(o["sha256"]), o["name"], bound)
            if found.problem:
                return found.problem, ""
            suspicious = suspicious or found.suspicious
            twin = s.exec(select(Output.job_id, Output.name).where(Output.sha256 == o["sha256"])).first()
            if twin and not suspicious:
                suspicious = f"{o['name']} is byte for byte the output {twin[1]} of job {twin[0]}"
        return "", suspicious

    def on_result(self, s: Session, task: Task, job: Job, worker_id: str, tier: str, suspicious: str,
                  now: float) -> bool:
        """Start a check of a stored result of ``worker_id`` (of ``tier``) when due. True: the task waits in
        ``verifying``."""
        if not self.enabled or task.kind not in ("render", "diffusion"):
            return False
        outs = s.exec(select(Output).where(Output.task_id == task.id).where(Output.attempt == task.attempt)).all()
        pictures = [o for o in outs if Path(o.name).suffix.lower() in PICTURES and not is_pass_output(o.name)]
        if not pictures:
            return False
        rate = C.CHECK_RATE.get(tier, 1.0)
        if not suspicious and self.rng.random() >= rate:
            return False
        if not self._someone_else(task.kind, worker_id, task.spec):
            self._event(s, task, worker_id, "unverified: no other worker is online to check this result", now)
            return False
        full = bool(suspicious) or (C.CHECK_FULL_WHILE_NEW and R.TIER_RANK[tier] <= R.TIER_RANK[Tier.new])
        reason = suspicious or ("new worker" if tier in (Tier.new, Tier.probation) else f"sampled at {rate:.0%}")
        transition(s, task, TaskStatus.verifying, reason=f"spot check: {reason}", worker_id=worker_id,
                   attempt=task.attempt, now=now)
        self.start(s, task, job, worker_id, self.rng.choice(pictures), "full" if full else "crops", reason, now)
        return True

    def start(self, s: Session, task: Task, job: Job, suspect: str, out: Output, mode: str, reason: str,
              now: float, parent: Check | None = None, exclude: list[str] | None = None) -> Check:
        """Queue a check of ``out`` (an output of ``task``) for a worker other than ``exclude``."""
        check = Check(job_id=task.job_id, task_id=task.id, attempt=task.attempt, suspect_id=suspect, mode=mode,
                      reason=reason[:300], frame=out.frame, output_name=out.name, created_at=now,
                      parent_id=parent.id if parent else None)
        if task.kind == "render" and mode in ("crops", "tiebreak") and not task.spec.get("settings", {}).get("tile"):
            check.regions = parent.regions if parent else self._crops(out)
        s.add(check)
        s.flush()
        self._queue(s, check, task, job, out, exclude or [suspect], only=None, now=now)
        return check

    def _crops(self, out: Output) -> list[list[int]]:
        w, h = compare.image_size(self.core.blobs.path(out.sha256))
        side = math.sqrt(C.CHECK_CROP_FRACTION)
        cw, ch = max(1, min(w, round(w * side))), max(1, min(h, round(h * side)))
        regions = []
        for _ in range(C.CHECK_CROPS):
            x0, y0 = self.rng.randrange(0, w - cw + 1), self.rng.randrange(0, h - ch + 1)
            regions.append([x0, x0 + cw, y0, y0 + ch])
        return regions

    def _queue(self, s: Session, check: Check, task: Task, job: Job, out: Output, exclude: list[str],
               only: str | None, now: float) -> Task:
        ext = Path(out.name).suffix
        if task.kind == "diffusion":  # the image made again: a diffusion task like any other
            images = [im for im in task.spec.get("images", []) if im.get("name") == out.name]
            spec = {**task.spec, "images": images, "outputs": [out.name]}
            kind = "diffusion"
        elif task.spec.get("settings", {}).get("tile") or check.mode == "probe" or not check.regions:
            # a tile, a whole frame, a probe: rendered again exactly as asked (a render task like any other)
            spec = {**{k: v for k, v in task.spec.items() if k != "final"}, "frames": [out.frame],
                    "outputs": [out.name]}
            if "passes" in spec.get("settings", {}):  # the frame again, without its passes (not checked yet)
                spec["settings"] = {k: v for k, v in spec["settings"].items() if k != "passes"}
            kind = "render"
        else:
            settings = {k: v for k, v in task.spec.get("settings", {}).items() if k != "passes"}
            n = max(1, len(check.regions))
            spec = {"scene_sha256": task.spec.get("scene_sha256"), "frames": [out.frame], "settings": settings,
                    "regions": check.regions, "outputs": [f"check_{i}{ext}" for i in range(n)]}
            if task.spec.get("project"):  # the scene's whole project: every input of the render is the tree's
                spec["project"] = task.spec["project"]
            kind = "verify"
        spec.update(check_id=check.id, exclude=sorted(set(exclude)), only_worker=only)
        vt = Task(job_id=task.job_id, index=task.index, kind=kind, priority=job.priority + 1, spec=spec,
                  inputs=list(task.inputs) if spec.get("project") else
                  [i for i in task.inputs if i in (spec.get("scene_sha256"), spec.get("model_hash"))]
                  or list(task.inputs), status=TaskStatus.queued.value, progress_total=1, check_id=check.id,
                  created_at=now, updated_at=now)
        s.add(vt)
        s.flush()
        check.verify_task_id = vt.id
        s.add(check)
        s.add(Event(at=now, kind="task", job_id=task.job_id, task_id=vt.id, new="queued",
                    worker_id=check.suspect_id,
                    detail=f"check {check.id} ({check.mode}) of task {task.index} {out.name}: {check.reason}"))
        self.core.request_assignment()
        return vt

    # ------------------------------------------------------------------ who may run a check
    def _someone_else(self, kind: str, suspect: str, spec: dict) -> bool:
        check_kind = "diffusion" if kind == "diffusion" else "verify"
        return any(c.worker_id != suspect and c.tier != Tier.probation and self.core.fits(check_kind, c, spec)
                   for c in self.core.seats())

    @staticmethod
    def may_take(task: Task, conn: Seat) -> bool:
        """Whether ``conn`` may run check task ``task`` (never the worker checked; probes only the probed)."""
        only = task.spec.get("only_worker")
        if only:
            return conn.worker_id == only
        return conn.worker_id not in task.spec.get("exclude", []) and conn.tier != Tier.probation

    # ------------------------------------------------------------------ results of checks
    def on_check_result(self, s: Session, vt: Task, verifier: Worker, outputs: list[dict[str, Any]],
                        now: float) -> None:
        check = s.get(Check, vt.check_id)
        if check is None or check.status != CheckStatus.pending:
            return
        check.verifier_id = verifier.id
        task = s.get(Task, check.task_id)
        shas = [o["sha256"] for o in sorted(outputs, key=lambda o: o["name"])]
        check.metric = {**check.metric, "outputs": shas}
        if check.mode == "probe":
            self._decide_probe(s, check, verifier, shas, now)
            return
        stale = task is None or task.attempt != check.attempt or task.status != TaskStatus.verifying.value
        if stale:  # the task moved on (canceled, voided by another check): nothing to decide
            self._close(s, check, CheckStatus.canceled, {"why": f"task is {task.status if task else 'gone'}"}, now)
            return
        ref = self._result(s, check)
        suspect = s.get(Worker, check.suspect_id)
        result = self._compare(ref, shas, check.regions, suspect, verifier)
        if check.mode == "tiebreak":
            self._decide_tiebreak(s, check, task, suspect, verifier, result, shas, now)
        elif result["passed"]:
            self._passed(s, check, task, suspect, verifier, result, now)
        elif R.at_least(verifier.tier, Tier.trusted) or verifier.vouched:
            self._failed(s, check, task, suspect, result, now)
        else:  # two untrusted workers disagree: a third settles it
            self._close(s, check, CheckStatus.disputed, result, now)
            job = s.get(Job, task.job_id)
            out = self._output(s, check)
            self.start(s, task, job, check.suspect_id, out, "tiebreak", f"check {check.id} disputed", now,
                       parent=check, exclude=[check.suspect_id, verifier.id])

    def _result(self, s: Session, check: Check) -> rasters.Raster:
        return rasters.read(self.core.blobs.path(self._output(s, check).sha256))

    def _output(self, s: Session, check: Check) -> Output:
        return s.exec(select(Output).where(Output.task_id == check.task_id).where(Output.attempt == check.attempt)
                      .where(Output.name == check.output_name)).one()

    def _compare(self, ref: rasters.Raster, shas: list[str], regions: list, a: Worker, b: Worker) -> dict:
        exact = compare.device_class(a.capabilities) == compare.device_class(b.capabilities)
        boxes = regions or [None]
        if len(shas) != len(boxes):
            return {"passed": False, "why": f"{len(shas)} files for {len(boxes)} regions"}
        worst: dict = {"passed": True, "equal": True, "ssim": 1.0, "max_diff": 0.0, "why": "", "exact": exact}
        for box, sha in zip(boxes, shas):
            try:  # a re-render is no larger than its region (or the frame it re-renders)
                got = rasters.read(self.core.blobs.path(sha),
                                   *((box[1] - box[0], box[3] - box[2]) if box else (ref.width, ref.height)))
            except (rasters.RasterError, OSError) as exc:
                return {"passed": False, "why": f"the re-render cannot be read: {exc}", "exact": exact}
            r = compare.compare(ref, tuple(box) if box else None, got, exact)
            if not r["passed"] or r.get("ssim", 1.0) < worst["ssim"]:
                worst = {**r, "exact": exact, "region": box}
            if not r["passed"]:
                break
        return worst

    def _passed(self, s, check: Check, task: Task, suspect: Worker, verifier: Worker, result: dict,
                now: float) -> None:
        self._close(s, check, CheckStatus.passed, result, now)
        self.core.evidence(s, suspect, "check_passed", now, task.job_id, task.id, f"check {check.id} ({check.mode})")
        self._event(s, task, suspect.id, f"check {check.id} passed ({check.mode}, by {verifier.id})", now)
        self.core.accept(s, task, s.get(Job, task.job_id), suspect.id, now)

    def _failed(self, s, check: Check, task: Task, suspect: Worker, result: dict, now: float) -> None:
        self._close(s, check, CheckStatus.failed, result, now)
        why = result.get("why", "")
        self.core.evidence(s, suspect, "check_failed", now, task.job_id, task.id, f"check {check.id}: {why}")
        job = s.get(Job, task.job_id)
        jw = s.get(JobWorker, (job.id, suspect.id)) or JobWorker(job_id=job.id, worker_id=suspect.id)
        failed_here = s.exec(select(func.count()).select_from(Check).where(Check.job_id == job.id)
                             .where(Check.suspect_id == suspect.id).where(Check.status == CheckStatus.failed.value)).one()
        jw.failures += 1
        jw.blocked = jw.blocked or failed_here >= C.CHECK_BLOCKLIST_AFTER
        s.add(jw)
        log.warning("worker %s failed check %d: %s", suspect.id, check.id, why,
                    extra=ctx(job.id, task.id, check.attempt, suspect.id))
        self.void(s, task, job, suspect.id, f"failed spot check {check.id}: {why}", now)
        # everything else it made for this job is suspect now: check it all again, whole
        for other in s.exec(select(Task).join(Attempt, (Attempt.task_id == Task.id) & (Attempt.attempt == Task.attempt))
                            .where(Task.job_id == job.id).where(Task.status == TaskStatus.accepted.value)
                            .where(Task.kind.in_(("render", "diffusion")))
                            .where(Attempt.worker_id == suspect.id)).all():
            outs = s.exec(select(Output).where(Output.task_id == other.id).where(Output.attempt == other.attempt)).all()
            pics = [o for o in outs if Path(o.name).suffix.lower() in PICTURES and not is_pass_output(o.name)]
            if not pics:
                continue
            self._unaccept(s, other, job, now)
            for o in pics:
                self.start(s, other, job, suspect.id, o, "full", f"recheck: worker failed check {check.id}", now)

    def check_failed(self, s: Session, vt: Task, reason: str, now: float, canceled: bool = False) -> None:
        """A check task failed for good (the verifiers could not render it): no verdict, the result stands."""
        if not canceled and vt.status != TaskStatus.failed.value:
            transition(s, vt, TaskStatus.failed, reason=reason, attempt=vt.attempt, now=now)
        check = s.get(Check, vt.check_id)
        if check is None or check.status != CheckStatus.pending:
            return
        task = s.get(Task, check.task_id)
        live = task is not None and task.attempt == check.attempt and task.status == TaskStatus.verifying.value
        if check.mode == "crops" and not canceled and live:
            # regions are refused for some scenes (EEVEE, a compositor reading neighbours): check it whole
            self._close(s, check, CheckStatus.canceled, {"why": f"regions could not be rendered: {reason}"[:500]}, now)
            self.start(s, task, s.get(Job, task.job_id), check.suspect_id, self._output(s, check), "full",
                       f"{check.reason}; regions refused", now)
            return
        self._close(s, check, CheckStatus.unverified if check.mode != "probe" else CheckStatus.canceled,
                    {"why": f"the re-render failed: {reason}"[:500]}, now)
        if check.mode != "probe" and task is not None and task.attempt == check.attempt \
                and task.status == TaskStatus.verifying.value:
            self._event(s, task, check.suspect_id, f"unverified: check {check.id}: {reason}", now)
            self.core.accept(s, task, s.get(Job, task.job_id), check.suspect_id, now)

    def expire(self, s: Session, now: float) -> None:
        """Checks queued longer than CHECK_WAIT that no connected worker may run (the only other worker
        left): the result stands unverified rather than holding the job up for ever."""
        for vt in s.exec(select(Task).where(Task.status == TaskStatus.queued.value)
                         .where(Task.check_id.is_not(None)).where(Task.created_at < now - C.CHECK_WAIT)).all():
            if any(self.core.fits(vt.kind, c, vt.spec) and self.may_take(vt, c) for c in self.core.seats()):
                continue
            transition(s, vt, TaskStatus.canceled, reason=f"no worker could check it within {C.CHECK_WAIT:g} s",
                       attempt=vt.attempt, now=now)
            self.check_failed(s, vt, "no other worker online to run it", now, canceled=True)

    def _decide_tiebreak(self, s, check: Check, task: Task, suspect: Worker, third: Worker, vs_suspect: dict,
                         shas: list[str], now: float) -> None:
        parent = s.get(Check, check.parent_id)
        first = s.get(Worker, parent.verifier_id) if parent else None
        if vs_suspect["passed"]:  # the third agrees with the result: the first verifier re-rendered wrongly
            if first is not None:
                self.core.evidence(s, first, "check_failed", now, task.job_id, task.id,
                                    f"its re-render for check {parent.id} disagreed with two workers")
            self._passed(s, check, task, suspect, third, vs_suspect, now)
            return
        # does the third agree with the first verifier? compare their re-renders region by region
        agree = parent is not None and first is not None and len(parent.metric.get("outputs", [])) == len(shas)
        if agree:
            exact = compare.device_class(first.capabilities) == compare.device_class(third.capabilities)
            for a, b in zip(parent.metric["outputs"], shas):
                bound = compare.size_bound(task.kind, task.spec)
                try:
                    r = compare.compare(rasters.read(self.core.blobs.path(a), *bound), None,
                                        rasters.read(self.core.blobs.path(b), *bound), exact)
                except (rasters.RasterError, OSError) as exc:
                    r = {"passed": False, "why": f"a re-render cannot be read: {exc}"}
                agree = agree and r["passed"]
        if agree:
            self._failed(s, check, task, suspect, {**vs_suspect, "why": f"two workers ({first.id}, {third.id}) "
                                                   f"re-rendered it alike; {vs_suspect.get('why', '')}"}, now)
        else:  # three different answers: this scene does not render alike on these workers
            self._close(s, check, CheckStatus.unverified, {**vs_suspect, "why": "three workers rendered it differently"}, now)
            self._event(s, task, suspect.id, "unverified: three workers rendered it differently; accepted "
                        "without a verdict", now)
            self.core.accept(s, task, s.get(Job, task.job_id), suspect.id, now)

    def _close(self, s, check: Check, status: CheckStatus, metric: dict, now: float) -> None:
        check.status, check.decided_at = status.value, now
        check.metric = {**check.metric, **{k: v for k, v in metric.items() if k != "region" or v is not None}}
        s.add(check)

    # ------------------------------------------------------------------ voiding results
    def _unaccept(self, s, task: Task, job: Job, now: float) -> None:
        """An accepted task goes back to ``verifying`` (its result is to be checked again)."""
        transition(s, task, TaskStatus.verifying, reason="re-checked: its worker failed a spot check", now=now,
                   attempt=task.attempt)
        job.tasks_accepted = max(0, job.tasks_accepted - 1)
        s.add(job)

    def void(self, s, task: Task, job: Job, worker_id: str, reason: str, now: float) -> None:
        """Drop the task's result: its outputs go, the attempt is marked voided (never paid), the task is
        queued again for another worker, and tasks built from its outputs wait for the new ones."""
        att = s.exec(select(Attempt).where(Attempt.task_id == task.id).where(Attempt.attempt == task.attempt)).first()
        if att:
            att.outcome, att.error = "voided", reason[:2000]
            s.add(att)
        for o in s.exec(select(Output).where(Output.task_id == task.id)).all():
            s.delete(o)
        if task.status == TaskStatus.accepted.value:
            job.tasks_accepted = max(0, job.tasks_accepted - 1)
            s.add(job)
        task.failed_workers = sorted(set(task.failed_workers) | ({worker_id} if worker_id else set()))
        task.error, task.work_units, task.progress_done = reason[:2000], 0.0, 0
        transition(s, task, TaskStatus.queued, reason=f"voided: {reason}", worker_id=worker_id,
                   attempt=task.attempt, now=now)
        self._revert_dependents(s, task, job, now)
        self.core.request_assignment()

    def _revert_dependents(self, s, task: Task, job: Job, now: float) -> None:
        for dep in s.exec(select(TaskDep).where(TaskDep.needs_id == task.id)).all():
            t = s.get(Task, dep.task_id)
            if t is None or t.status in (TaskStatus.waiting.value, TaskStatus.canceled.value,
                                         TaskStatus.failed.value):
                continue
            if t.status in [x.value for x in TASK_LEASED]:
                self.core.revoke_one(s, t, "an input of this task was voided", now)
            elif t.status == TaskStatus.accepted.value:
                self.void(s, t, job, "", "an input was voided", now)  # recursive: its own dependents too
            if t.status != TaskStatus.waiting.value:
                t.inputs = [i for i in t.inputs if i not in t.spec.get("input_names", {}).values()]
                transition(s, t, TaskStatus.waiting, reason="an input was voided; waiting for its re-render",
                           attempt=t.attempt, now=now)

    # ------------------------------------------------------------------ probation and probes
    def probe(self, s: Session, conn: Seat, now: float) -> bool:
        """Queue a probe for a worker on probation (one at a time, backing off after failures)."""
        if now < self.probe_after.get(conn.worker_id, 0.0):
            return False
        pending = s.exec(select(Check.id).where(Check.suspect_id == conn.worker_id).where(Check.mode == "probe")
                         .where(Check.status == CheckStatus.pending.value)).first()
        if pending:
            return False
        row = s.exec(select(Output, Task).join(Task, (Task.id == Output.task_id) & (Task.attempt == Output.attempt))
                     .where(Task.kind == "render").where(Task.status == TaskStatus.accepted.value)
                     .where(Output.worker_id != conn.worker_id).where(Output.final)
                     .order_by(func.random()).limit(1)).first()
        self.probe_after[conn.worker_id] = now + C.PROBE_BACKOFF
        if row is None or row[1].spec.get("settings", {}).get("tile") or \
                Path(row[0].name).suffix.lower() not in PICTURES or not self.core.fits("verify", conn, None):
            return False
        out, task = row
        job = s.get(Job, task.job_id)
        check = Check(job_id=task.job_id, task_id=task.id, attempt=task.attempt, suspect_id=conn.worker_id,
                      mode="probe", reason="probation: re-render an accepted frame", frame=out.frame,
                      output_name=out.name, created_at=now)
        s.add(check)
        s.flush()
        self._queue(s, check, task, job, out, [], only=conn.worker_id, now=now)
        return True

    def _decide_probe(self, s, check: Check, probed: Worker, shas: list[str], now: float) -> None:
        out = s.exec(select(Output).where(Output.task_id == check.task_id).where(Output.name == check.output_name)
                     ).first()
        task = s.get(Task, check.task_id)
        if out is None or task is None or task.status != TaskStatus.accepted.value:
            self._close(s, check, CheckStatus.canceled, {"why": "the reference result is gone"}, now)
            return
        author = s.get(Worker, out.worker_id) or probed
        result = self._compare(rasters.read(self.core.blobs.path(out.sha256)), shas, [], author, probed)
        passed = bool(result["passed"])
        self._close(s, check, CheckStatus.passed if passed else CheckStatus.failed, result, now)
        self.core.evidence(s, probed, "probe_passed" if passed else "probe_failed", now, check.job_id,
                            check.task_id, f"probe {check.id}: {result.get('why', '')}")
        back = self.probe_backoff.get(probed.id, C.PROBE_BACKOFF)
        self.probe_backoff[probed.id] = C.PROBE_BACKOFF if passed else min(3600.0, back * 2)
        self.probe_after[probed.id] = now + (0 if passed else self.probe_backoff[probed.id])

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _event(s, task: Task, worker_id: str, detail: str, now: float) -> None:
        s.add(Event(at=now, kind="task", job_id=task.job_id, task_id=task.id, attempt=task.attempt,
                    worker_id=worker_id, old=task.status, new=task.status, detail=detail[:2000]))
