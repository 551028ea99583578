"""The coordinator's brain: worker messages in, state changes persisted, replies out.

:meth:`Coordinator.step` takes a batch of raw messages from the ROUTER socket, handles them all in one
database transaction, hands out leases to free workers, commits, and only then returns the replies to
send (persist before acknowledging; one commit per batch keeps throughput high). It does no I/O on
sockets, so tests drive it directly. Invariants:

* every reply about a task carries (task_id, attempt); a message whose pair is not the task's current
  lease held by the sender is stale and changes nothing (fencing);
* a lease is only granted to a connected worker with a free slot, and is lost when the worker goes
  silent for HEARTBEAT_LIVENESS intervals, says BYE, reconnects without it, or lets it expire; one handed
  back with RELEASE (its owner paused the worker) is requeued without fault: no reputation evidence, and
  released attempts do not count against the task's attempts (only against the hard cap);
* a malformed message is answered with ERROR and never raises out of ``step``.

The assignment round and the lease it grants are :class:`farm.core.assignment.Assignment`, which the
coordinator owns; the in-memory copies the hot path reads (live leases, the head of the queue) are in
:mod:`farm.core.leases`. Verification (:mod:`farm.verify`) is owned too, and reaches back only through
the typed port it declares (:class:`farm.verify.port.Core`: accept, evidence, revoke, request an
assignment round, the connected workers).

What a step does is split by responsibility: HELLO's checks (:mod:`farm.core.admission`), blobs over the
plane (:mod:`farm.core.blob_requests`), a RESULT's check and the tasks it sets free
(:mod:`farm.core.results`), failures and lost leases (:mod:`farm.core.failures`, through the typed port
it declares) and what they spend of a task's attempts (:mod:`farm.core.attempts`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Any, Callable

from sqlalchemy import bindparam, update
from sqlalchemy.orm.attributes import instance_state
from sqlmodel import Session, select

from common import limits as L
from common import protocol as P
from common.logs import ctx
from farm import constants as C
from farm.core import admission, attempts, prefetch
from farm.core.assignment import Assignment
from farm.core.blob_requests import BlobRequests
from farm.core.earnings_port import Earnings
from farm.core.failures import Failures
from farm.core.leases import LeaseBook, ProgressWatch, TaskRow
from farm.core.results import Dependents, check_outputs
from farm.core.scheduler import RUNTIME_FOR_KIND, Conn, Scheduler, claim_ratio, fits, yardstick
from farm.kinds import jobs
from farm.kinds import probe as probes
from farm.kinds.registry import JOB_STATUS_LISTENERS, SWEEPS, JobListener, Sweep
from farm.store.blobs import BlobStore
from farm.store.changes import touched
from farm.store.db import session as new_session
from farm.store.models import Attempt, Job, Output, Task, Worker
from farm.store.sealed import SealedChannel
from farm.store.states import QUEUE_EPOCH, TASK_LEASED, JobStatus, TaskStatus, transition
from farm.store.writes import StaleRow, StepSession, add_row, add_to, set_values, update_by
from farm.verify import reputation as R
from farm.verify.reputation import Tier
from farm.verify.verifier import Verifier, is_check

log = logging.getLogger("farm.core.coordinator")

Outgoing = list[tuple[bytes, Any]]
LEASED = tuple(s.value for s in TASK_LEASED)


def _get(s: Session, model: type, pk):
    """``s.get(model, pk)``, without its overhead when the row is loaded already (prefetched)."""
    obj = s.identity_map.get((model, (pk,), None))
    if obj is not None:
        state = instance_state(obj)
        if not state.expired and not state._deleted:
            return obj
    return s.get(model, pk)


# the tasks of a batch that the lease book does not hold, and the jobs of all its tasks
_TASKS = select(Task).where(Task.id.in_(bindparam("ids", expanding=True)))
_JOBS = select(Job).where(Job.id.in_(bindparam("ids", expanding=True)))


class Coordinator:
    def __init__(self, engine, blobs: BlobStore, scheduler: Scheduler | None = None,
                 clock: Callable[[], float] = time.time, verify: bool = True,
                 listeners: tuple[JobListener, ...] = JOB_STATUS_LISTENERS, require_sandbox: bool = False,
                 sweeps: tuple[Sweep, ...] = SWEEPS, earnings: Earnings | None = None,
                 quoting: probes.Quoting | None = None, sealed: SealedChannel | None = None):
        self.engine = engine
        self.sealed = sealed  # the sealed blob channel's tickets and files (farm.store.sealed), or None
        self.quoting = quoting  # re-makes a probed job's quote (payments' port, farm.kinds.probe), or None
        self.blobs = blobs
        self.scheduler = scheduler or Scheduler()
        self.clock = clock
        self.conns: dict[bytes, Conn] = {}
        self.by_worker: dict[str, bytes] = {}
        self.pending: Outgoing = []      # replies queued from outside step (cancel via the API)
        # peers whose send queue is full (they read nothing): routing id → since when (set by the broker's
        # sends, cleared by its next send that fits); served nothing more, and dropped after the liveness time
        self.congested: dict[bytes, float] = {}
        self.median_speed: float | None = None  # scheduler.yardstick of the connected workers (each sweep)
        self._canceling: set[int] | None = None  # canceled jobs with tasks left to cancel (None: not looked yet)
        self.want_assign = True          # set when work or capacity may have appeared
        self.listeners = listeners       # job-status reactions of the job kinds (farm.kinds.registry)
        self.sweeps = sweeps             # and their periodic ones (changes made off this thread)
        self.require_sandbox = require_sandbox  # refuse workers whose runtime children are not sandboxed
        self.earnings = earnings         # prices and credited shares for workers (payments' port), or None
        self._last_sweep = 0.0
        self.caught_up: float | None = None  # the last step that read every message waiting (its batch not full)
        self.stats = defaultdict(int)
        self.dependents = Dependents()   # tasks waiting for others (assemble, encode), released on accept
        self.progress = ProgressWatch()  # leases need progress: heartbeats alone do not keep them
        self.book = LeaseBook()  # live leases' tasks: RESULT and friends need not read them again
        self.blob_requests = BlobRequests(blobs, self.book, self.congested, self.stats, sealed)
        # jobs as the last committed step left them (detached), good while QUEUE_EPOCH holds: every job
        # change made elsewhere moves it (farm/core/leases.py), and status changes are fenced (farm/store/states.py)
        self._jobs: dict[int, Job] = {}
        self._jobs_epoch: int | None = None
        # called by step, in its thread, as it starts to commit (the broker receives meanwhile)
        self.on_commit: Callable[[], None] | None = None
        self.failures = Failures(self)
        self.verifier = Verifier(self, enabled=verify, seed=None if scheduler is None else scheduler.rng.random())
        self.assignment = Assignment(self.scheduler, self._job, Verifier.may_take)
        # message class → its handler, _on_<name> (HELLO is handled before a connection exists)
        self._handlers = {cls: getattr(self, f"_on_{cls.__name__.lower()}") for cls in P.MESSAGES.values()
                          if hasattr(self, f"_on_{cls.__name__.lower()}")}
        self._handlers[P.BlobGet] = self.blob_requests.on_get
        self._handlers[P.BlobPut] = self.blob_requests.on_put
        self._handlers[P.TicketGet] = self.blob_requests.on_ticket
        with new_session(engine) as s:  # a restart: nobody is connected until they say HELLO again
            s.exec(update(Worker).where(Worker.online).values(online=False))
            s.commit()

    # ------------------------------------------------------------------ entry points
    def step(self, batch: list[list[bytes]], now: float | None = None) -> Outgoing:
        """Handle ``batch`` (ROUTER frames: routing id first), assign, sweep if due; commit; return replies."""
        now = self.clock() if now is None else now
        if len(batch) < C.BATCH_MAX_MESSAGES or self.caught_up is None:
            self.caught_up = now
        out: Outgoing = []
        if self._jobs_epoch != QUEUE_EPOCH.value:
            self._jobs.clear()
            self._jobs_epoch = QUEUE_EPOCH.value
        self.blob_requests.new_step()
        try:
            with self._undo_on_error():
                with StepSession(self.engine) as s:
                    msgs = [self._decode(frames) for frames in batch]
                    rows = self._prefetch(s, msgs)  # noqa: F841  (held: the session's identity map is weak)
                    for ident, msg in msgs:
                        self._dispatch(s, ident, msg, now, out)
                    self._maintain(s, now, out)
                    # on_commit once the statements are sent: the commit that follows only waits for the disk
                    s.commit(before_wait=self.on_commit)
                    self._committed(s)
        except Exception as exc:  # a handler bug must not take the coordinator down: retry one by one
            if isinstance(exc, StaleRow):  # the lease book was stale (it is emptied): read from the database
                self.stats["stale_cache"] += 1
                log.warning("batch of %d handled again from the database: %s", len(batch), exc)
            else:
                log.exception("batch of %d failed; retrying its messages one at a time", len(batch))
            out = []
            for frames in batch + [None]:  # None: the assignment round and sweep, on their own
                one: Outgoing = []
                try:
                    with self._undo_on_error():
                        with StepSession(self.engine) as s:
                            if frames is None:
                                self._maintain(s, now, one)
                            else:
                                self._handle(s, frames, now, one)
                            s.commit()
                            self._committed(s)
                    out += one
                except Exception:
                    log.exception("dropping a message that could not be handled")
                    if frames:
                        out.append((frames[0], P.Error("internal error handling this message; it was dropped")))
        out, self.pending = self.pending + out, []
        return out

    def _committed(self, s: Session) -> None:
        """Keep the tasks of the leases granted by a committed step (a rolled-back one's are dropped), and
        its jobs while nothing else changed a job meanwhile."""
        new = s.info.get("leased")
        if new:
            self.book.commit(new)
        if self._jobs_epoch == QUEUE_EPOCH.value:
            for job in s.info.get("jobs", ()):
                self._jobs[job.id] = job
        else:
            self._jobs.clear()

    def _job(self, s: Session, job_id: int) -> Job | None:
        """The job ``job_id`` in ``s``: loaded already, from the last step's copy (no query), or read."""
        job = s.identity_map.get((Job, (job_id,), None))
        if job is None:
            cached = self._jobs.get(job_id)
            job = s.merge(cached, load=False) if cached is not None else s.get(Job, job_id)
            if job is not None:
                s.info.setdefault("jobs", []).append(job)  # held for the step, and kept after its commit
        return job

    @contextlib.contextmanager
    def _undo_on_error(self):
        """Restore the in-memory scheduling state when a transaction is rolled back, so that a lease that
        was never committed does not keep a worker's slot, and the assignment round is not forgotten."""
        # taken before every step for every connection: plain tuples (Held.copy is two references, its dicts
        # are never changed in place), not a dict of copied dicts (bench/scale.py --idle, 1,000 connections:
        # ~450 -> ~100 µs a step)
        saved = [(ident, c.free, c.held.copy()) for ident, c in self.conns.items()]
        want = self.want_assign
        try:
            yield
        except Exception:
            for ident, n, held in saved:
                conn = self.conns.get(ident)
                if conn is not None:
                    conn.free = n
                    conn.held.restore(held)
            self.want_assign = want or True
            self.book.clear()  # its copies may hold changes that were never committed
            self.assignment.ahead.clear()
            self._jobs.clear()
            raise

    def cancel_job(self, job_id: int, user) -> dict[str, Any]:
        """Cancel a job for the API. Runs on the coordinator's thread (like ``step``), so task rows are
        never written by two threads at once. Returns the job's view."""
        with new_session(self.engine) as s:
            job = jobs.get_job(s, job_id, user)
            leases = jobs.cancel_job(s, job)
            self.job_changed(s, job, self.clock())
            s.commit()
            if self._canceling is not None:
                self._canceling.add(job.id)  # the rest of its tasks, a batch a sweep
            self.revoke(leases, "the job was canceled")
            return jobs.job_view(s, job)

    def job_changed(self, s: Session, job: Job, now: float) -> None:
        """Tell the job kinds' listeners that ``job`` changed status (a chained job may start or fail)."""
        for listener in self.listeners:
            if listener(s, job, now):
                self.want_assign = True

    def revoke(self, leases: list[tuple[str, int, int]], reason: str) -> None:
        """Queue CANCEL for leases already ended in the database. Coordinator thread only."""
        for worker_id, task_id, attempt in leases:
            self.book.drop(task_id)
            ident = self.by_worker.get(worker_id)
            if ident is not None:
                self.pending.append((ident, P.Cancel(task_id, attempt, reason)))
                self.freed(self.conns[ident], task_id)
        self.want_assign = True

    def heartbeats(self) -> Outgoing:
        return [(ident, P.Heartbeat()) for ident in self.conns]

    # ------------------------------------------------------------------ dispatch
    def _handle(self, s: Session, frames: list[bytes], now: float, out: Outgoing) -> None:
        ident, msg = self._decode(frames)
        self._dispatch(s, ident, msg, now, out)

    @staticmethod
    def _decode(frames: list[bytes]) -> tuple[bytes | None, P.Message | P.ProtocolError | None]:
        """(routing id, message), the message a ProtocolError when malformed; (None, None) for no message."""
        if len(frames) < 2:
            return None, None
        try:
            return bytes(frames[0]), P.decode(frames[1:])
        except P.ProtocolError as exc:
            return bytes(frames[0]), exc

    def _prefetch(self, s: Session, msgs: list) -> list:
        """Load in two queries the rows the batch's task messages will read that the lease book does not
        hold (tasks, and the jobs of all of them), instead of a few queries per message. Returns them: the
        caller keeps them referenced for the step (the session's identity map is weak)."""
        task_ids = set()
        for ident, msg in msgs:
            if isinstance(msg, (P.Result, P.Progress, P.Failed)):
                task_ids.add(msg.task_id)
            elif isinstance(msg, P.Heartbeat):
                task_ids.update(p[0] for p in msg.running if len(p) == 2 and type(p[0]) is int)
        if not task_ids:
            return []
        book = self.book.rows
        job_ids, missing = set(), []
        for tid in task_ids:
            row = book.get(tid)
            if row is None:
                missing.append(tid)
            else:
                job_ids.add(row.job_id)
        rows = s.exec(_TASKS, params={"ids": missing}).all() if missing else []
        job_ids.update(t.job_id for t in rows)
        unknown = [j for j in job_ids if j not in self._jobs]
        if unknown:
            s.info.setdefault("jobs", []).extend(s.exec(_JOBS, params={"ids": unknown}).all())
        for jid in job_ids:
            self._job(s, jid)
        return rows

    def _task(self, s: Session, task_id: int) -> Task | TaskRow | None:
        """A task a message names: the lease book's copy (fenced) when it holds it, else the row."""
        return self.book.get(s, task_id) or _get(s, Task, task_id)

    def _dispatch(self, s: Session, ident: bytes | None, msg, now: float, out: Outgoing) -> None:
        if ident is None:
            return
        if isinstance(msg, P.ProtocolError):
            self.stats["malformed"] += 1
            log.warning("malformed message from %s: %s", ident.hex(), msg)
            out.append((ident, P.Error(f"malformed message: {msg}")))
            return
        if isinstance(msg, P.Hello):
            self._hello(s, ident, msg, now, out)
            return
        conn = self.conns.get(ident)
        if conn is None:
            out.append((ident, P.Disconnect("unknown connection: reconnect and send HELLO first")))
            return
        conn.last_seen = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            out.append((ident, P.Error(f"{type(msg).__name__} is not a worker message")))
            return
        handler(s, conn, msg, now, out)

    def _assign(self, s: Session, now: float, out: Outgoing) -> None:
        """The assignment round: probes for workers on probation first (they get no other work), then
        leases of queued tasks to every free slot."""
        self.want_assign = False
        if self.verifier.enabled:
            for conn in self.conns.values():  # workers on probation earn their way back with probes
                if conn.tier == Tier.probation and conn.free > 0:
                    self.verifier.probe(s, conn, now)
        self.assignment.run(s, self.conns.values(), now, out)

    def _maintain(self, s: Session, now: float, out: Outgoing) -> None:
        if now - self._last_sweep >= C.SWEEP_INTERVAL:
            self._last_sweep = now
            self._sweep(s, now, out)
        if self.want_assign:
            self._assign(s, now, out)

    # ------------------------------------------------------------------ worker lifecycle
    def _hello(self, s: Session, ident: bytes, msg: P.Hello, now: float, out: Outgoing) -> None:
        refused = admission.refusal(msg, self.require_sandbox)
        if refused is not None:
            out.append((ident, refused))
            return
        running = P.running_pairs(msg.running)
        old = self.by_worker.get(msg.worker_id)
        if old is not None and old != ident:
            self._unlist(old)
            out.append((old, P.Disconnect("this worker id connected again from a new socket")))
        w = admission.worker_row(s, msg, now)
        conn = Conn(ident, msg.worker_id, msg.slots, msg.capabilities, now,
                    held_blobs=set(msg.capabilities.get("cached", []) or []))
        conn.set_standing(w)
        self.conns[ident] = conn
        self.by_worker[msg.worker_id] = ident
        kept = 0
        for task in s.exec(select(Task).where(Task.worker_id == msg.worker_id).where(Task.status.in_(LEASED))):
            self.book.drop(task.id)  # changed below through the ORM
            if (task.id, task.attempt) in running and conn.held.room():  # never more than its bound
                task.lease_expires = now + C.LEASE_SECONDS
                s.add(task)
                conn.held.add(task.id, task.attempt)
                if task.status == TaskStatus.running.value:
                    conn.held.start(task.id, now)
                kept += 1
            else:
                self.failures.lose(s, task, now, "the worker reconnected without this task" if (task.id, task.attempt)
                           not in running else "the worker reconnected listing more leases than its slots allow", out)
        conn.free = 0  # until READY
        log.info("worker %s connected (%d slots, %d leases kept, tier %s)", msg.worker_id, msg.slots, kept,
                 conn.tier, extra=ctx(worker=msg.worker_id))
        out.append((ident, P.Welcome(msg.worker_id, L.HEARTBEAT_INTERVAL, L.HEARTBEAT_LIVENESS,
                                     L.BLOB_CHUNK_SIZE, L.BLOB_CREDIT)))
        if self.earnings is not None:
            out.append((ident, self.earnings.price()))
            out.extend((ident, m) for m in self.earnings.recent(s, msg.worker_id))

    def _unlist(self, ident: bytes) -> None:
        """Forget connection ``ident`` (and void its sealed-channel tickets)."""
        self.conns.pop(ident, None)
        if self.sealed is not None:
            self.sealed.drop_connection(ident)

    def _drop(self, s: Session, conn: Conn, now: float, reason: str, out: Outgoing) -> None:
        self._unlist(conn.identity)
        if self.by_worker.get(conn.worker_id) == conn.identity:
            del self.by_worker[conn.worker_id]
        w = s.get(Worker, conn.worker_id)
        if w:
            w.online, w.last_seen = False, now
            s.add(w)
        for task in s.exec(select(Task).where(Task.worker_id == conn.worker_id).where(Task.status.in_(LEASED))):
            self.failures.lose(s, task, now, reason, out)
        log.info("worker %s gone: %s", conn.worker_id, reason, extra=ctx(worker=conn.worker_id))

    def _on_ready(self, s, conn: Conn, msg: P.Ready, now, out) -> None:
        """READY n: n more leases wanted, up to the room its bound leaves (farm/core/prefetch.py)."""
        if msg.free_slots > conn.held.room():  # asks past the bound: first forget leases that ended
            # a plain read, not the lease book's fenced copy: the sweep of this same step may still end
            # one of these leases, and a fence taken here would then fail the whole batch (StaleRow)
            conn.held.prune(lambda task_id, attempt: self._holds(_get(s, Task, task_id), conn, attempt))
        conn.free = max(0, min(conn.held.room(), msg.free_slots))
        self.want_assign = True

    def freed(self, conn: Conn, task_id: int) -> None:
        """A lease of ``conn`` ended on the coordinator's side: its place is free again."""
        conn.held.end(task_id)
        conn.free = min(conn.held.room(), conn.free + 1)

    def _on_heartbeat(self, s, conn: Conn, msg: P.Heartbeat, now, out) -> None:
        try:
            pairs = P.running_pairs(msg.running)
        except P.ProtocolError as exc:
            out.append((conn.identity, P.Error(str(exc))))
            return
        for task_id, attempt in pairs:
            task = self._task(s, task_id)
            if not self._holds(task, conn, attempt):
                out.append((conn.identity, P.Cancel(task_id, attempt, "this lease is no longer yours")))
            elif self.progress.stalled(task, now, claim_ratio(conn, self.median_speed)):
                self.stats["stalled"] += 1  # not renewed: the lease runs out and the task goes elsewhere
                if isinstance(task, TaskRow):  # read, not written: the sweep may take it back this step
                    s.writes.unfence(Task, task.id)
            elif task.lease_expires - now < C.LEASE_SECONDS / 2:
                set_values(s, task, lease_expires=now + C.LEASE_SECONDS)

    def _on_bye(self, s, conn: Conn, msg: P.Bye, now, out) -> None:
        self._drop(s, conn, now, f"said bye: {msg.reason}"[:200], out)

    def _on_release(self, s, conn: Conn, msg: P.Release, now, out) -> None:
        """A lease handed back because the worker's owner paused it: requeued at once, nobody's fault."""
        task = s.get(Task, msg.task_id)  # the ORM row (its lease ends here, leaving the book)
        if not self._holds(task, conn, msg.attempt):
            out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, False, "stale attempt; ignored")))
            return
        reason = f"handed back: {msg.reason}"[:200]
        log.info("lease %s", reason, extra=ctx(task.job_id, task.id, task.attempt, conn.worker_id))
        self.end_attempt(s, task, "released", reason, now)
        task.worker_id, task.lease_expires = None, None
        conn.held.end(task.id)
        self.stats["released"] += 1
        # a release is free, so it must stay bounded: past RELEASES_PER_JOB hand-backs in one job the worker
        # takes none of its tasks any more (as a worker that failed it too often); blocked, its leases and
        # releases cost the task nothing, so strangers that take and hand back cannot wear a task out
        given_back = attempts.block_after_releases(s, task, conn.worker_id)
        if given_back is not None:
            log.info("worker %s handed back %d tasks of job %d: it takes no more of them", conn.worker_id,
                     given_back, task.job_id, extra=ctx(task.job_id, task.id, task.attempt, conn.worker_id))
        transition(s, task, TaskStatus.queued, reason=reason, worker_id=conn.worker_id, attempt=task.attempt, now=now)
        self.want_assign = True
        out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, True)))

    # ------------------------------------------------------------------ task messages (fenced)
    @staticmethod
    def _holds(task: Task | None, conn: Conn, attempt: int) -> bool:
        return (task is not None and task.status in LEASED and task.attempt == attempt
                and task.worker_id == conn.worker_id)

    def _on_progress(self, s, conn: Conn, msg: P.Progress, now, out) -> None:
        task = self._task(s, msg.task_id)
        if not self._holds(task, conn, msg.attempt):
            out.append((conn.identity, P.Cancel(msg.task_id, msg.attempt, "stale attempt: stop working on it")))
            return
        if task.status == TaskStatus.assigned.value:
            transition(s, task, TaskStatus.running, worker_id=conn.worker_id, attempt=task.attempt, now=now)
            update_by(s, Attempt, {"task_id": task.id, "attempt": task.attempt}, progressed=True)  # buffered, no read
        if conn.held.start(task.id, now):  # it waited (prefetched) until now: its own clock starts here
            self.progress.last[(task.id, task.attempt)] = now
        done = max(0, min(msg.done, task.progress_total or msg.done))
        if self.progress.progressed(task, done, now):  # a repeated count renews nothing
            set_values(s, task, progress_done=done, lease_expires=now + C.LEASE_SECONDS)
            touched(s, task.job_id)  # the job's live page shows the count at this step's commit
            prefetch.carry(self.progress, conn.held, now)  # what waits behind a visible render is not stalled

    def _on_result(self, s, conn: Conn, msg: P.Result, now, out) -> None:
        task = self._task(s, msg.task_id)
        if not self._holds(task, conn, msg.attempt):
            self.stats["stale"] += 1
            out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, False,
                                             "stale attempt: this task was re-leased; result discarded")))
            return
        self.book.drop(task.id)
        # a prefetched lease's wait behind another render is not its frame's time: count from its first PROGRESS
        began = conn.held.began.get(task.id) if conn.held.depth else None
        conn.held.end(task.id)
        sizes: dict[str, int] = {}
        problem = check_outputs(self.blobs, task, msg.outputs, sizes)
        suspicious = ""
        if not problem:
            problem, suspicious = self.verifier.inspect(s, task, msg.outputs)
        if problem:
            if isinstance(task, TaskRow):  # _fail changes the ORM row: read it, current, and check it again
                s.writes.unfence(Task, task.id)
                task = s.get(Task, task.id)
            if self._holds(task, conn, msg.attempt):
                self.failures.fail(s, task, conn.worker_id, f"invalid result: {problem}", True, now, out, "invalid_result")
            out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, False, problem)))
            return
        job = self._job(s, task.job_id)
        if isinstance(task, TaskRow):
            started = task.started_at
        else:
            started = (att := attempts.current(s, task)) and att.started_at
        began = began or started
        seconds = max(0.0, float(msg.render_seconds))
        if started:  # a worker cannot claim more time than the lease lasted
            seconds = min(seconds, max(0.0, now - started))
        self.progress.finished(task, now - began if began else None)
        update_by(s, Attempt, {"task_id": task.id, "attempt": task.attempt}, outcome="done", ended_at=now,
                  render_seconds=seconds)
        transition(s, task, TaskStatus.done, worker_id=conn.worker_id, attempt=task.attempt, now=now,
                   values=dict(render_seconds=seconds, progress_done=task.progress_total, worker_id=None,
                               lease_expires=None))
        self.stats["results"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("result stored (%.2f s)", seconds, extra=ctx(task.job_id, task.id, task.attempt, conn.worker_id))
        out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, True)))
        if is_check(task):
            transition(s, task, TaskStatus.accepted, reason="re-render stored", worker_id=conn.worker_id,
                       attempt=task.attempt, now=now)
            w = _get(s, Worker, conn.worker_id)
            if w:
                self.verifier.on_check_result(s, task, w, msg.outputs, now)
            return
        if probes.is_probe(task, job):  # measured on our clock, its output discarded, the job quoted and let go
            probes.finish(s, job, task, now - began if began else seconds, seconds, conn.worker_id, now, self.quoting)
            self.job_changed(s, job, now)
            self.want_assign = True
            return
        final = bool(task.spec.get("final", True))
        for o in msg.outputs:
            add_row(s, Output, job_id=task.job_id, task_id=task.id, attempt=task.attempt, frame=o.get("frame", 0),
                    name=o["name"], sha256=o["sha256"], size=sizes.get(o["sha256"]) or self.blobs.size(o["sha256"]),
                    final=final,
                    worker_id=conn.worker_id, render_seconds=float(o.get("seconds", 0.0)))
        if self.verifier.on_result(s, task, job, conn.worker_id, conn.tier, suspicious, now):
            return
        self.accept(s, task, job, conn.worker_id, now)

    def accept(self, s: Session, task: Task | TaskRow, job: Job, worker_id: str, now: float) -> None:
        """Count a stored (and, when checked, verified) result as good work: meter it, release the tasks
        waiting for it, and mark the job rendered when it was the last."""
        runtime = RUNTIME_FOR_KIND.get(task.kind, task.kind)
        ident = self.by_worker.get(worker_id)
        if ident in self.conns:  # connected: its standing is in memory (Conn.set_standing)
            known, speed = True, self.conns[ident].speeds.get(runtime)
        else:
            w = _get(s, Worker, worker_id)
            known, speed = w is not None, w is not None and R.speed(w, runtime)
        units = round(task.render_seconds * (speed or 1.0), 6) if known else None
        transition(s, task, TaskStatus.accepted, reason="outputs stored", worker_id=worker_id,
                   attempt=task.attempt, now=now, values=None if units is None else {"work_units": units})
        if known:  # added in the database: the row in memory may be older than another step's change
            add_to(s, Worker, worker_id, tasks_done=1, render_seconds=task.render_seconds, work_units=units)
        add_to(s, Job, job.id, tasks_accepted=1)  # the loaded row follows
        if self.dependents.release(s, task, now):
            self.want_assign = True
        if job.tasks_accepted >= job.tasks_total and job.status == JobStatus.active.value:
            self.dependents.forget(job.id)
            transition(s, job, JobStatus.rendered, reason="every task accepted", now=now)
            for measured in R.measure_job(s, job.id, now):
                self.refresh_standing(measured)
            self.job_changed(s, job, now)

    def _on_failed(self, s, conn: Conn, msg: P.Failed, now, out) -> None:
        task = s.get(Task, msg.task_id)  # the ORM row: _fail changes it (and the lease ends, leaving the book)
        if not self._holds(task, conn, msg.attempt):
            out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, False, "stale attempt; ignored")))
            return
        conn.held.end(task.id)
        self.failures.fail(s, task, conn.worker_id, msg.reason[:2000], msg.retryable, now, out)
        out.append((conn.identity, P.Ack(msg.task_id, msg.attempt, True)))

    # ------------------------------------------------------------------ ends of leases (farm/core/failures.py)
    def end_attempt(self, s: Session, task: Task, outcome: str, error: str, now: float) -> None:
        """End ``task``'s current attempt: out of the lease book and the progress watch, its row ended."""
        self.book.drop(task.id)
        self.progress.finished(task)
        attempts.end(s, task, outcome, error, now)

    def revoke_one(self, s: Session, task: Task, reason: str, now: float) -> None:
        """End a live lease on the coordinator's side (CANCEL to its worker); the caller moves the task."""
        self.end_attempt(s, task, "canceled", reason, now)
        ident = self.by_worker.get(task.worker_id)
        if ident in self.conns:
            self.pending.append((ident, P.Cancel(task.id, task.attempt, reason)))
            self.freed(self.conns[ident], task.id)
        task.worker_id, task.lease_expires = None, None
        self.want_assign = True

    def evidence(self, s: Session, w: Worker, kind: str, now: float, job_id: int | None = None,
                 task_id: int | None = None, detail: str = "") -> None:
        """Record reputation evidence about ``w`` and give the scheduler its new standing at once."""
        R.record(s, w, kind, now, job_id, task_id, detail)
        self.refresh_standing(w)

    def request_assignment(self) -> None:
        """Run an assignment round at the end of this step (work or capacity may have appeared)."""
        self.want_assign = True

    def seats(self) -> list[Conn]:
        """The connected workers (verification's port)."""
        return list(self.conns.values())

    fits = staticmethod(fits)

    def refresh_standing(self, w: Worker) -> None:
        """Copy ``w``'s reputation, tier and speed to its connection, if it is connected."""
        ident = self.by_worker.get(w.id)
        if ident in self.conns:
            self.conns[ident].set_standing(w)

    def _sweep(self, s: Session, now: float, out: Outgoing) -> None:
        liveness = L.HEARTBEAT_INTERVAL * L.HEARTBEAT_LIVENESS
        deadline = now - liveness
        # silence counts from when the coordinator last read all that waited: behind a backlog a worker's
        # heartbeats may be queued unread (1,000 workers reconnecting at once kept it busy for seconds, and it
        # dropped the first ones, which reconnected: bench/scale.py); for at most BACKLOG_GRACE seconds
        silent_before = max(now - C.BACKLOG_GRACE, min(now, self.caught_up or now)) - liveness
        self.median_speed = yardstick(self.conns.values())
        for conn in [c for c in self.conns.values() if c.last_seen < silent_before]:
            self._drop(s, conn, now, "missed heartbeats", out)
            out.append((conn.identity, P.Disconnect("missed heartbeats: reconnect")))
        for ident, since in list(self.congested.items()):
            if ident not in self.conns:
                self.congested.pop(ident, None)
            elif since < deadline:  # it has read nothing for the liveness time: it is not a working peer
                self.congested.pop(ident, None)
                self.stats["congested_dropped"] += 1
                self._drop(s, self.conns[ident], now, "its send queue stayed full: it reads none of its messages", out)
        for task in s.exec(select(Task).where(Task.status.in_(LEASED)).where(Task.lease_expires < now)):
            if self.progress.take_stall(task):  # its worker heart-beat but made no progress
                attempts.mark_staller(s, task)  # not this worker again; off the job if it never finished a frame
                self.failures.lose(s, task, now, "lease expired: no progress for longer than this job's frames take", out)
            else:
                self.failures.lose(s, task, now, "lease expired", out)
        if self.verifier.enabled:
            self.verifier.expire(s, now)
        self._finish_cancels(s, now)
        if self.earnings is not None and (price := self.earnings.moved(now)) is not None:
            out.extend((ident, price) for ident in self.conns)  # the market moved: `farm worker` shows it live
        for worker_id, msg in self.earnings.credited(s, now) if self.earnings is not None else ():
            if (ident := self.by_worker.get(worker_id)) in self.conns:
                out.append((ident, msg))
        for sweep in self.sweeps:
            if sweep(s, now):
                self.want_assign = True

    def _finish_cancels(self, s: Session, now: float) -> None:
        """The next batch of a canceled job's tasks (jobs.cancel_rest), for the jobs this coordinator
        canceled and, once at its first sweep, those a stopped one left half done: the sweep does not scan
        the queue for them."""
        if self._canceling is None:
            self._canceling = set(jobs.leftover_cancels(s))
        for job_id in sorted(self._canceling)[:1]:
            if jobs.cancel_rest(s, job_id, f"job {job_id} was canceled", now) < C.CANCEL_BATCH:
                self._canceling.discard(job_id)
