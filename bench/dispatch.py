"""Dispatch throughput: null tasks through the real coordinator, against a raw ZeroMQ echo ceiling.

    python bench/dispatch.py [--quick] [--profile] [--broker-thread] [--procs K] [--n 1,10,50] [--tasks T]
                             [--repeat R] [--db sqlite|pg|postgresql://…]

For each worker count N, two runs, side by side in this one process (alternating, ``--repeat`` times,
medians reported):

* **farm**: the real :class:`farm.plane.broker.Broker` + :class:`farm.core.coordinator.Coordinator` on a real
  SQLite file (WAL, synchronous=FULL, as ``farm serve`` runs it) in a temporary directory, and with
  ``--db pg`` or ``--db postgresql://…`` also on PostgreSQL (a fresh database per run, durable settings:
  bench/databases.py), each database in turn in every round, bound to
  ``tcp://127.0.0.1:0``, with one job of T one-frame tasks made by :func:`farm.kinds.jobs.create_blender_job`.
  N DEALER workers speak the real protocol: HELLO, READY, then for each TASK at once a RESULT
  whose outputs (one per frame) all name one tiny blob stored beforehand in the coordinator's BlobStore,
  and READY right behind it (as worker/daemon.py sends READY after each final message, not after its
  ACK). A completion counts when its ACK arrives (the coordinator commits before it acknowledges, so
  every counted completion is durable).
* **echo**: the same worker code against a bare ROUTER that answers READY with a pre-encoded TASK and
  RESULT with a pre-encoded ACK (no decoding, no database): the physical ceiling of this harness. One
  task is two requests and two replies (READY→TASK, RESULT→ACK), RESULT and READY sent back to back.

The workers run in ``--procs`` K = 2 child processes (as remote workers would: their Python does not
share the coordinator process's GIL), each driving its share of the N sockets from one synchronous
``zmq.Poller`` loop, the lightest harness (they share this machine's two cores with the coordinator);
``--proc-loop asyncio`` makes them asyncio coroutines as ``farm worker`` is. ``--procs 0`` runs them on
the broker's own asyncio loop instead, where their Python shares the coordinator's GIL (and the echo's
ceiling counts their cost too). The farm and the echo runs always use the same harness. The process
tunes its garbage collector as ``farm serve`` does (:func:`farm.plane.broker.tune_gc`; ``--default-gc`` not).

After every farm run the database is checked: each task accepted exactly once (attempt 1, one Attempt
row, one Output row), the job ``rendered``, and every ACK accepted and distinct. ``--profile`` adds one
profiled farm run (cProfile on the coordinator's step thread and on the event loop; top 15 by cumulative
time each).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import multiprocessing
import pstats
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func  # noqa: E402
from sqlmodel import select  # noqa: E402

from common import limits as L
from common import protocol as P  # noqa: E402
from farm import constants as C  # noqa: E402
from farm.core.coordinator import Coordinator  # noqa: E402
from farm.kinds import jobs
from farm.plane.broker import Broker, tune_gc  # noqa: E402
from farm.store.blobs import BlobStore  # noqa: E402
from farm.store.db import make_engine, session  # noqa: E402
from farm.store.models import Attempt, Job, Output, Task  # noqa: E402
from farm.web import auth  # noqa: E402

from bench.databases import Backend, backends, stop_all  # noqa: E402

SCENE = b"BLENDER-v500" + bytes(256)          # passes the .blend magic check; never opened
OUTPUT = b"\x89PNG\r\n\x1a\nbench-null-output"  # the one output blob every RESULT names
SQLITE = Backend("sqlite")


# ---------------------------------------------------------------- the in-process workers
@dataclass
class Tally:
    target: int
    acks: list[tuple[int, int]] = field(default_factory=list)
    rejected: int = 0
    welcomed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    all_welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    t_go: float = 0.0
    t_done: float = 0.0
    shared: "Shared | None" = None  # the count across worker processes (--procs)

    def ack(self, task_id: int, attempt: int, accepted: bool) -> None:
        if not accepted:
            self.rejected += 1
        self.acks.append((task_id, attempt))
        if self.shared is not None:
            self.shared.count(self)
        elif len(self.acks) == self.target:
            self.t_done = time.perf_counter()
            self.done.set()


@dataclass
class Shared:
    """Completions counted across worker processes: perf_counter is CLOCK_MONOTONIC, one clock for all."""
    total: Any   # multiprocessing.Value("q")
    t_done: Any  # multiprocessing.Value("d")
    done: Any    # multiprocessing.Event
    target: int

    def count(self, tally: Tally | None, k: int = 1) -> None:
        with self.total.get_lock():
            before = self.total.value
            self.total.value = before + k
            last = before < self.target <= before + k
        if last:
            self.t_done.value = time.perf_counter()
            self.done.set()
            if tally is not None:
                tally.done.set()


def answer(task: P.Task, out_sha: str, out_size: int) -> list[P.Message]:
    """What a benchmark worker sends for ``task``: its RESULT at once (one output per frame, all naming
    the one stored blob), and READY right behind it, as worker/daemon.py does after its final message.
    Nothing is running between the two, so heartbeats always report no running tasks."""
    outs = [{"frame": f, "sha256": out_sha, "size": out_size, "name": f"frame_{f:04d}.png", "seconds": 0.0}
            for f in task.spec["frames"]]
    return [P.Result(task.task_id, task.attempt, outs, 0.0), P.Ready(1)]


async def worker(ctx: zmq.asyncio.Context, endpoint: str, wid: str, n: int, tally: Tally,
                 out_sha: str, out_size: int) -> None:
    """One worker with one slot: RESULT at once for each TASK, READY after each ACK."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def send(msg) -> None:
        sock.send_multipart(P.encode(msg), flags=zmq.NOBLOCK)

    async def heartbeat() -> None:  # the coordinator drops workers silent for HEARTBEAT_LIVENESS intervals
        while True:
            await asyncio.sleep(L.HEARTBEAT_INTERVAL)
            send(P.Heartbeat([]))

    hb = None
    try:
        send(P.Hello(wid, "", 1, {"runtimes": ["blender"], "hostname": "bench"}))
        while not isinstance(P.decode(await sock.recv_multipart()), P.Welcome):
            pass
        hb = asyncio.ensure_future(heartbeat())
        tally.welcomed += 1
        if tally.welcomed == n:
            tally.all_welcomed.set()
        await tally.go.wait()
        send(P.Ready(1))
        while True:
            msg = P.decode(await sock.recv_multipart())
            if isinstance(msg, P.Task):
                for reply in answer(msg, out_sha, out_size):
                    send(reply)
            elif isinstance(msg, P.Ack):
                tally.ack(msg.task_id, msg.attempt, msg.accepted)
            elif isinstance(msg, (P.Disconnect, P.Error)):
                raise RuntimeError(f"worker {wid} got {msg}")
    finally:
        if hb is not None:
            hb.cancel()
        sock.close(0)


async def drive_workers(ctx, endpoint: str, n: int, tasks: int, out_sha: str, out_size: int,
                        loop_prof: cProfile.Profile | None = None) -> Tally:
    tally = Tally(tasks)
    done = None
    ws = [asyncio.ensure_future(worker(ctx, endpoint, f"bench-{i:03d}", n, tally, out_sha, out_size))
          for i in range(n)]
    try:
        await asyncio.wait_for(tally.all_welcomed.wait(), 30)
        if loop_prof:
            loop_prof.enable()
        tally.t_go = time.perf_counter()
        tally.go.set()
        done = asyncio.ensure_future(tally.done.wait())
        finished, _ = await asyncio.wait([done, *ws], return_when=asyncio.FIRST_COMPLETED, timeout=600)
        if loop_prof:
            loop_prof.disable()
        if done not in finished:
            for w in finished:
                w.result()  # a worker that died: raise its error
            raise RuntimeError(f"timed out with {len(tally.acks)}/{tasks} completions")
    finally:
        for w in [*ws, done]:
            if w is not None:
                w.cancel()
        await asyncio.gather(*ws, return_exceptions=True)
    return tally


def _worker_proc(endpoint: str, ids: list[str], shared: Shared, go, stop, ready_q, result_q, out_sha: str,
                 out_size: int) -> None:
    """A child process running some of the workers on its own loop (``--procs``)."""
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_worker_proc_main(endpoint, ids, shared, go, stop, ready_q, result_q, out_sha, out_size))


async def _worker_proc_main(endpoint, ids, shared, go, stop, ready_q, result_q, out_sha, out_size) -> None:
    ctx = zmq.asyncio.Context()
    tally = Tally(shared.target, shared=shared)
    ws = [asyncio.ensure_future(worker(ctx, endpoint, wid, len(ids), tally, out_sha, out_size)) for wid in ids]
    error = ""
    try:
        await asyncio.wait_for(tally.all_welcomed.wait(), 60)
        ready_q.put(len(ids))
        await asyncio.to_thread(go.wait)
        tally.go.set()
        stopped = asyncio.ensure_future(asyncio.to_thread(stop.wait))
        finished, _ = await asyncio.wait([stopped, *ws], return_when=asyncio.FIRST_COMPLETED)
        for w in finished:
            if w is not stopped and w.exception():
                error = repr(w.exception())
    except Exception as exc:  # noqa: BLE001  (reported to the parent)
        error = repr(exc)
    finally:
        for w in ws:
            w.cancel()
        await asyncio.gather(*ws, return_exceptions=True)
        result_q.put((tally.acks, tally.rejected, error))
        ctx.destroy(0)


def drain(poller: zmq.Poller, wait_ms: float):
    """(socket, decoded message) for every message waiting on the sockets ``poller`` finds readable within
    ``wait_ms``, read without blocking: the receive half of the harness's poller loops."""
    for sock, _ in poller.poll(wait_ms):
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            yield sock, P.decode(frames)


class Ticks:
    """The harness loop's two clocks: whether ``stop`` is set (looked at every 50 ms) and whether a
    heartbeat is due (every HEARTBEAT_INTERVAL: the coordinator drops workers silent for
    HEARTBEAT_LIVENESS intervals)."""

    def __init__(self, stop):
        self.stop = stop
        self.next_hb = self.next_stop = time.monotonic()

    def stopped(self) -> bool:
        now = time.monotonic()
        if now < self.next_stop:
            return False
        self.next_stop = now + 0.05
        return self.stop.is_set()

    def heartbeat_due(self) -> bool:
        now = time.monotonic()
        if now < self.next_hb:
            return False
        self.next_hb = now + L.HEARTBEAT_INTERVAL
        return True


def tally(msg, acks: list[tuple[int, int, bool]]) -> int:
    """Count a coordinator's reply that is not a TASK: an ACK is kept (task, attempt, accepted) and counts
    1; a DISCONNECT or ERROR ends the run (a harness worker never deserves one); anything else counts 0."""
    if isinstance(msg, P.Ack):
        acks.append((msg.task_id, msg.attempt, msg.accepted))
        return 1
    if isinstance(msg, (P.Disconnect, P.Error)):
        raise RuntimeError(f"a worker got {msg}")
    return 0


def _poller_proc(endpoint: str, ids: list[str], shared: Shared, go, stop, ready_q, result_q, out_sha: str,
                 out_size: int) -> None:
    """A child process running some of the workers (``--procs``, the default ``--proc-loop poller``): the
    protocol of :func:`worker`, message for message, for all of them in one synchronous ``zmq.Poller``
    loop. The harness shares this 2-core machine with the coordinator: asyncio's per-message futures
    would make it the larger load of the two."""
    logging.basicConfig(level=logging.WARNING)
    ctx = zmq.Context()
    acks: list[tuple[int, int, bool]] = []
    error = ""
    nb = int(zmq.NOBLOCK)

    def send(sock, msg) -> None:
        sock.send_multipart(P.encode(msg), flags=nb)
    try:
        poller, socks = zmq.Poller(), []
        for wid in ids:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            send(sock, P.Hello(wid, "", 1, {"runtimes": ["blender"], "hostname": "bench"}))
            poller.register(sock, zmq.POLLIN)
            socks.append(sock)
        waiting, deadline = set(socks), time.monotonic() + 60
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} workers not welcomed in 60 s")
            for sock, _ in poller.poll(1000):
                if isinstance(P.decode(sock.recv_multipart()), P.Welcome):
                    waiting.discard(sock)
        ready_q.put(len(ids))
        go.wait()
        for sock in socks:
            send(sock, P.Ready(1))
        ticks = Ticks(stop)
        while not ticks.stopped():
            if ticks.heartbeat_due():
                for sock in socks:
                    send(sock, P.Heartbeat([]))
            acked = 0
            for sock, msg in drain(poller, 50):
                if isinstance(msg, P.Task):
                    for reply in answer(msg, out_sha, out_size):
                        send(sock, reply)
                else:
                    acked += tally(msg, acks)
            if acked:
                shared.count(None, acked)
    except Exception as exc:  # noqa: BLE001  (reported to the parent)
        error = repr(exc)
    finally:
        result_q.put(([(t, a) for t, a, _ in acks], sum(not ok for *_, ok in acks), error))
        ctx.destroy(0)


async def drive_worker_procs(endpoint: str, n: int, tasks: int, procs: int, out_sha: str, out_size: int,
                             proc_loop: str = "poller") -> Tally:
    """The same N workers, spread over ``procs`` child processes (as remote workers would be: their Python
    does not share the coordinator process's GIL). Timed from the go signal to the last ACK."""
    mp = multiprocessing.get_context("spawn")
    shared = Shared(mp.Value("q", 0), mp.Value("d", 0.0), mp.Event(), tasks)
    go, stop, ready_q, result_q = mp.Event(), mp.Event(), mp.Queue(), mp.Queue()
    ids = [f"bench-{i:03d}" for i in range(n)]
    children = [mp.Process(target=_poller_proc if proc_loop == "poller" else _worker_proc, daemon=True,
                           args=(endpoint, ids[i::procs], shared, go, stop, ready_q, result_q, out_sha, out_size))
                for i in range(min(procs, n))]
    tally = Tally(tasks)
    for c in children:
        c.start()
    try:
        for _ in children:
            await asyncio.to_thread(ready_q.get, True, 120)
        tally.t_go = time.perf_counter()
        go.set()
        if not await asyncio.to_thread(shared.done.wait, 600):
            raise RuntimeError(f"timed out with {shared.total.value}/{tasks} completions")
        tally.t_done = shared.t_done.value
    finally:
        stop.set()
        errors = []
        for _ in children:
            acks, rejected, error = await asyncio.to_thread(result_q.get, True, 60)
            tally.acks += acks
            tally.rejected += rejected
            errors += [error] if error else []
        for c in children:
            await asyncio.to_thread(c.join, 30)
    if errors:
        raise RuntimeError(f"worker processes failed: {errors}")
    return tally


# ---------------------------------------------------------------- servers: real broker or bare echo
class BrokerHost:
    """Runs a coroutine server either on the caller's loop or on its own loop in a thread."""

    def __init__(self, in_thread: bool):
        self.in_thread = in_thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.task = None

    async def start(self, make_coro, ready):
        if not self.in_thread:
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.ensure_future(make_coro())
            return await ready()
        started = threading.Event()
        box: dict = {}

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)

            async def main():
                t = asyncio.ensure_future(make_coro())
                box["endpoint"] = await ready()
                started.set()
                await t
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc
                started.set()
            finally:
                self.loop.close()
        self.thread = threading.Thread(target=run, name="broker-loop", daemon=True)
        self.thread.start()
        await asyncio.to_thread(started.wait, 30)
        if "error" in box:
            raise box["error"]
        return box["endpoint"]

    async def stop(self, stop_fn):
        if not self.in_thread:
            stop_fn()
            await self.task
            return
        self.loop.call_soon_threadsafe(stop_fn)
        await asyncio.to_thread(self.thread.join, 30)


class EchoServer:
    """A bare ROUTER: READY → pre-encoded TASK, RESULT → pre-encoded ACK, HELLO → WELCOME. It drains
    its queue in batches like the broker does, and decodes nothing but the command byte."""

    def __init__(self, ctx, scene_sha: str):
        self.ctx = ctx
        self.endpoint = ""
        self._ready = None
        self._stop = False
        spec = {"frames": [1], "settings": {"format": "PNG", "color_depth": "8", "samples": None,
                                            "resolution_percent": None, "max_resolution": L.MAX_RESOLUTION},
                "scene_sha256": scene_sha}
        self.replies = {
            P.Hello.command: P.encode(P.Welcome("w", L.HEARTBEAT_INTERVAL, L.HEARTBEAT_LIVENESS,
                                                L.BLOB_CHUNK_SIZE, L.BLOB_CREDIT)),
            P.Ready.command: P.encode(P.Task(1, 1, 1, C.LEASE_SECONDS, "render", spec, [scene_sha])),
            P.Result.command: P.encode(P.Ack(1, 1, True)),
        }

    async def ready(self) -> str:
        while not self.endpoint:
            await asyncio.sleep(0.001)
        return self.endpoint

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        raw = zmq.Socket.shadow(sock.underlying)  # as the broker does: no future per message
        try:
            while not self._stop:
                if not await sock.poll(50):
                    continue
                for _ in range(C.BATCH_MAX_MESSAGES):
                    try:
                        frames = raw.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = self.replies.get(frames[2][0]) if len(frames) == 4 else None
                    if reply is not None:
                        raw.send_multipart([frames[0], *reply], flags=zmq.NOBLOCK)
        finally:
            sock.close(0)


# ---------------------------------------------------------------- one measured run
@dataclass
class RunResult:
    kind: str
    n: int
    tasks: int
    seconds: float
    steps: int = 0
    step_seconds: float = 0.0
    step_cpu: float = 0.0
    msgs: int = 0
    verified: str = ""
    db: str = ""

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


def setup_farm(tmp: Path, tasks: int, url: str | None = None):
    """A farm's database (``url``, or a SQLite file in ``tmp``) and blob store with one job of ``tasks``
    one-frame tasks; returns (engine, blobs, scene sha, output sha, job id)."""
    engine = make_engine(url or f"sqlite:///{tmp / 'farm.db'}")
    blobs = BlobStore(tmp / "blobs")
    scene_sha = blobs.write_bytes(SCENE)
    out_sha = blobs.write_bytes(OUTPUT)
    with session(engine) as s:
        owner, _ = auth.create_user(s, "bench", is_admin=True)
        job = jobs.create_blender_job(s, owner, blobs, {"scene_sha256": scene_sha, "frames": f"1-{tasks}",
                                                        "chunk": 1, "name": "bench"})
        s.commit()
        job_id = job.id
    return engine, blobs, scene_sha, out_sha, job_id


def verify(engine, job_id: int, tasks: int, tally: Tally | None) -> str:
    """Every task accepted exactly once, counted in the database, and every ACK distinct and accepted
    (``tally`` None: the database only; the caller checks the ACKs of several jobs together)."""
    with session(engine) as s:
        def count(q):
            return s.exec(q).one()
        accepted = count(select(func.count()).select_from(Task).where(Task.job_id == job_id)
                         .where(Task.status == "accepted").where(Task.attempt == 1))
        n_tasks = count(select(func.count()).select_from(Task).where(Task.job_id == job_id))
        attempts = count(select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id))
        done_attempts = count(select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id)
                              .where(Attempt.outcome == "done"))
        outputs = count(select(func.count()).select_from(Output).where(Output.job_id == job_id))
        out_tasks = count(select(func.count(func.distinct(Output.task_id))).where(Output.job_id == job_id))
        job = s.get(Job, job_id)
    problems = []
    if not (n_tasks == accepted == attempts == done_attempts == outputs == out_tasks == tasks):
        problems.append(f"tasks={n_tasks} accepted@attempt1={accepted} attempts={attempts} "
                        f"done={done_attempts} outputs={outputs} output-tasks={out_tasks}, want {tasks} each")
    if job.status != "rendered" or job.tasks_accepted != tasks:
        problems.append(f"job is {job.status} with {job.tasks_accepted} accepted")
    if tally is not None and (tally.rejected or len(set(tally.acks)) != len(tally.acks) or len(tally.acks) != tasks):
        problems.append(f"{len(tally.acks)} ACKs, {len(set(tally.acks))} distinct, {tally.rejected} rejected")
    if problems:
        raise AssertionError("database check failed: " + "; ".join(problems))
    return f"{tasks} tasks accepted once each ({outputs} outputs, {attempts} attempts, job rendered)"


async def run_farm(n: int, tasks: int, in_thread: bool, profile: bool = False, procs: int = 0,
                   proc_loop: str = "poller", backend: Backend | None = None):
    with tempfile.TemporaryDirectory(prefix="rh-dispatch-") as d, (backend or SQLITE).fresh(Path(d)) as url:
        engine, blobs, scene_sha, out_sha, job_id = setup_farm(Path(d), tasks, url)
        coord = Coordinator(engine, blobs, verify=False)  # null outputs; bench/verify.py measures checks
        res = RunResult("farm", n, tasks, 0.0, db=(backend or SQLITE).label)
        step = coord.step
        step_prof = cProfile.Profile() if profile else None

        timings = []  # (start, seconds, CPU seconds, messages) of every step: those of the timed run are summed

        def timed_step(batch, now=None):
            t, cpu = time.perf_counter(), time.thread_time()
            out = step_prof.runcall(step, batch, now) if step_prof else step(batch, now)
            timings.append((t, time.perf_counter() - t, time.thread_time() - cpu, len(batch)))
            return out
        coord.step = timed_step  # the broker looks the method up on every batch
        ctx = zmq.asyncio.Context()
        broker = Broker(coord, "tcp://127.0.0.1:0", ctx=ctx)
        host = BrokerHost(in_thread)
        loop_prof = cProfile.Profile() if profile else None
        try:
            endpoint = await host.start(broker.run, broker.ready)
            if loop_prof and in_thread:
                loop_prof = None  # the broker's loop thread is not profiled then; the step thread is
            if procs:  # the loop runs the broker only: profiled from the start
                if loop_prof:
                    loop_prof.enable()
                try:
                    tally = await drive_worker_procs(endpoint, n, tasks, procs, out_sha, len(OUTPUT), proc_loop)
                finally:
                    if loop_prof:
                        loop_prof.disable()
            else:
                tally = await drive_workers(ctx, endpoint, n, tasks, out_sha, len(OUTPUT), loop_prof)
        finally:
            await host.stop(broker.stop)
            ctx.destroy(0)
        res.seconds = tally.t_done - tally.t_go
        for start, seconds, cpu, msgs in timings:  # the steps from the go signal (the HELLOs come before it)
            if tally.t_go <= start <= tally.t_done:
                res.steps, res.step_seconds, res.step_cpu, res.msgs = (
                    res.steps + 1, res.step_seconds + seconds, res.step_cpu + cpu, res.msgs + msgs)
        res.verified = verify(engine, job_id, tasks, tally)
        engine.dispose()
    return res, step_prof, loop_prof


async def run_echo(n: int, tasks: int, in_thread: bool, procs: int = 0, proc_loop: str = "poller") -> RunResult:
    ctx = zmq.asyncio.Context()
    scene_sha = "0" * 64
    server = EchoServer(ctx, scene_sha)
    host = BrokerHost(in_thread)
    try:
        endpoint = await host.start(server.run, server.ready)
        tally = await (drive_worker_procs(endpoint, n, tasks, procs, "1" * 64, len(OUTPUT), proc_loop) if procs else
                       drive_workers(ctx, endpoint, n, tasks, "1" * 64, len(OUTPUT)))
    finally:
        await host.stop(server.stop)
        ctx.destroy(0)
    return RunResult("echo", n, tasks, tally.t_done - tally.t_go)


# ---------------------------------------------------------------- report
def top(prof: cProfile.Profile, title: str, limit: int = 15, only: str | None = None) -> str:
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    if only:
        st.print_stats(only, limit)
    else:
        st.print_stats(limit)
    lines = buf.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    body = [re.sub(r"\S*/(?:site-packages|lib/python3\.\d+)/", "", l.replace(str(ROOT) + "/", ""))
            for l in lines[start:] if l.strip()]
    return f"--- {title} (top {limit} by cumulative time)\n" + "\n".join(body)


def driver_share(prof: cProfile.Profile) -> str:
    """Seconds inside the database driver's own calls, from the profile: sqlite3's (statement execution;
    commit = WAL write + fsync) and psycopg's (waiting on the server's replies: a round trip each)."""
    totals: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in pstats.Stats(prof).stats.items():
        if filename == "~" and "sqlite3" in name:
            for key in ("execute", "commit", "fetch"):
                if key in name:
                    totals[f"sqlite3 {key}"] = totals.get(f"sqlite3 {key}", 0.0) + tt
        elif "psycopg" in filename and name in ("wait", "wait_c", "wait_epoll", "wait_select", "wait_poll"):
            totals["psycopg waiting for the server"] = totals.get("psycopg waiting for the server", 0.0) + tt
        elif filename == "~" and ("psycopg" in name or "wait_c" in name):
            totals["psycopg C calls"] = totals.get("psycopg C calls", 0.0) + tt
    return ", ".join(f"{k} {v:.2f} s" for k, v in totals.items()) or "no driver calls seen"


def top_self(prof: cProfile.Profile, title: str, limit: int = 15) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(limit)
    lines = buf.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    body = [re.sub(r"\S*/(?:site-packages|lib/python3\.\d+)/", "", l.replace(str(ROOT) + "/", ""))
            for l in lines[start:] if l.strip()]
    return f"--- {title} (top {limit} by own time)\n" + "\n".join(body)


async def main_async(args) -> int:
    ns = [int(x) for x in args.n.split(",")]
    where = ("broker on its own asyncio loop in a thread; workers on the main loop"
             if args.broker_thread else "broker and workers on one asyncio loop")
    if args.procs:
        where = (f"broker on {'its own loop in a thread' if args.broker_thread else 'the main loop'}; workers in "
                 f"{args.procs} child process(es), each with its own loop")
    dbs = backends(args.db)
    try:
        print(f"dispatch benchmark: {where}; coordinator.step in the broker's executor thread; "
              f"{args.repeat} run(s) each, medians; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}", flush=True)
        for b in dbs:
            print(f"  database {b.label}: {b.settings()}; a fresh database per run", flush=True)
        if not args.default_gc:  # as farm serve does once started (farm.plane.broker.tune_gc): the echo runs get it too
            tune_gc()
        return await _measure(args, ns, dbs)
    finally:
        stop_all(dbs)


async def _measure(args, ns: list[int], dbs: list[Backend]) -> int:
    rows = []
    for n in ns:
        farm: dict[str, list[RunResult]] = {b.label: [] for b in dbs}
        echo: list[RunResult] = []
        for _ in range(args.repeat):  # echo and every database in turn, so that a slow moment hits all alike
            echo.append(await run_echo(n, args.tasks, args.broker_thread, args.procs, args.proc_loop))
            for b in dbs:
                r, _, _ = await run_farm(n, args.tasks, args.broker_thread, procs=args.procs,
                                         proc_loop=args.proc_loop, backend=b)
                farm[b.label].append(r)
                print(f"  N={n:<3} {b.label:<10} farm {r.rate:8.0f} tasks/s ({r.seconds:.2f} s, {r.steps} steps, "
                      f"{r.msgs / max(1, r.steps):.1f} msgs/step, step busy {r.step_seconds / r.seconds:.0%}, "
                      f"step CPU {r.step_cpu / r.tasks * 1000:.2f} ms/task); echo {echo[-1].rate:8.0f} tasks/s — "
                      f"{r.verified}", flush=True)
        rows.append((n, farm, echo))
    print()
    print("one task = READY→TASK + RESULT→ACK (2 requests, 2 replies; RESULT and READY sent back to back); echo msgs/s counts request→reply pairs;")
    print("ratio = farm completions/s ÷ echo tasks/s (1.00 would be the bare ZeroMQ ceiling of this harness); "
          f"÷ {dbs[0].label}: completions/s ÷ those on {dbs[0].label} at the same N")
    hdr = (f"{'N':>4} {'database':>10} {'tasks':>6} {'seconds':>8} {'completions/s':>14} {'echo tasks/s':>13} "
           f"{'ratio':>6} {'÷ ' + dbs[0].label:>9} {'msgs/step':>10} {'step busy':>10} {'step CPU/task':>14}")
    print(hdr)
    print("-" * len(hdr))
    for n, farm, echo in rows:
        e_rate = statistics.median(r.rate for r in echo)
        base = statistics.median(r.rate for r in farm[dbs[0].label])
        for label, runs in farm.items():
            f_sec = statistics.median(r.seconds for r in runs)
            f_rate = statistics.median(r.rate for r in runs)
            per_step = statistics.median(r.msgs / max(1, r.steps) for r in runs)
            busy = statistics.median(r.step_seconds / r.seconds for r in runs)
            cpu = statistics.median(r.step_cpu / r.tasks * 1000 for r in runs)
            print(f"{n:>4} {label:>10} {args.tasks:>6} {f_sec:>8.2f} {f_rate:>14.0f} {e_rate:>13.0f} "
                  f"{f_rate / e_rate:>6.3f} {f_rate / base:>9.3f} {per_step:>10.1f} {busy:>10.0%} {cpu:>11.2f} ms")
    print("msgs/step: worker messages per Coordinator.step (one transaction, one commit); step busy: share of "
          "the run's wall time the coordinator thread spent in step; step CPU/task: its CPU time (thread_time) "
          "per completed task (on PostgreSQL the server's own CPU is not in it)")
    print(f"verified after every farm run: each of the {args.tasks} tasks accepted exactly once "
          "(Task/Attempt/Output rows counted, job rendered, ACKs distinct and accepted)")
    if args.profile:
        n = args.profile_n
        for b in dbs:
            print(f"\nprofiled farm run on {b.label}: N={n}, {args.tasks} tasks (cProfile slows it down)")
            r, step_prof, loop_prof = await run_farm(n, args.tasks, args.broker_thread, profile=True,
                                                     procs=args.procs, proc_loop=args.proc_loop, backend=b)
            print(f"  {r.rate:.0f} tasks/s under the profiler; {r.steps} steps, {r.msgs / max(1, r.steps):.1f} "
                  f"msgs/step, step busy {r.step_seconds / r.seconds:.0%} of {r.seconds:.2f} s — {r.verified}")
            total = pstats.Stats(step_prof).total_tt
            print(f"  coordinator thread: {total:.2f} s profiled, of which {driver_share(step_prof)}; "
                  "the rest is Python (SQLAlchemy ORM, handlers)")
            print(top(step_prof, "coordinator thread: Coordinator.step"))
            print(top(step_prof, "coordinator thread, project code only", only=str(ROOT / "farm")))
            print(top_self(step_prof, "coordinator thread"))
            if loop_prof:
                print(top(loop_prof, "event loop thread: broker + workers"))
                print("  (time inside zmq send on the loop thread is mostly waiting to re-take the GIL from the "
                      "busy coordinator thread: pyzmq releases it around each send)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks, one run each")
    ap.add_argument("--profile", action="store_true", help="add one cProfiled farm run")
    ap.add_argument("--profile-n", type=int, default=10, help="workers in the profiled run")
    ap.add_argument("--broker-thread", action="store_true",
                    help="run the broker on its own loop in a thread (default: same loop as the workers)")
    ap.add_argument("--procs", type=int, default=2,
                    help="run the workers in this many child processes (default 2; 0: on the broker's loop)")
    ap.add_argument("--proc-loop", choices=["poller", "asyncio"], default="poller",
                    help="with --procs: each child runs its workers in one zmq.Poller loop (default), or as asyncio "
                         "coroutines with a socket each (as before; the harness then costs the machine ~3x the CPU)")
    ap.add_argument("--default-gc", action="store_true",
                    help="keep Python's default garbage collector settings (farm serve tunes them: farm.plane.broker.tune_gc)")
    ap.add_argument("--n", default="1,10,50", help="worker counts")
    ap.add_argument("--db", default="sqlite",
                    help="comma-separated databases measured side by side: sqlite, pg (a durable PostgreSQL cluster "
                         "started here with tests/pg.py), or a postgresql://user@host:port/db URL (default sqlite); "
                         "pg or a URL alone means sqlite,pg")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per run (default 3000, quick 500)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per N (default 3, quick 1)")
    args = ap.parse_args()
    args.tasks = args.tasks or (500 if args.quick else 3000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if "sqlite" not in args.db.split(","):  # the ratio to SQLite is the point: always side by side
        args.db = "sqlite," + args.db
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
