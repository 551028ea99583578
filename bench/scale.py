"""Scale: many workers, many tasks of uneven length, through the real coordinator.

    python bench/scale.py [--quick] [--workers W] [--procs K] [--tasks T] [--mean S] [--slots K] [--seed N]
                          [--db sqlite|pg|postgresql://…] [--idle 0,100,1000] [--profile-idle]

The real :class:`farm.plane.broker.Broker` + :class:`farm.core.coordinator.Coordinator` on a SQLite file (WAL,
synchronous=FULL, as ``farm serve`` runs it) or on PostgreSQL (``--db``, bench/databases.py: durable
settings, a fresh database), T one-frame tasks in jobs of at most MAX_TASKS_PER_JOB (20,000: 100,000 tasks
are 5 jobs of one creator, as a big farm has many jobs; the limit is not raised) made by
:func:`farm.kinds.jobs.create_blender_job`, and W DEALER workers that speak the protocol as ``farm worker``
does: HELLO, READY, then for each TASK a PROGRESS, a wait of the task's synthetic duration instead of a
render, RESULT and at once READY again; HEARTBEAT every HEARTBEAT_INTERVAL listing the running tasks.
The workers run in ``--procs`` K child processes (default 2; each drives its share of the sockets from
one ``zmq.Poller`` loop with a timer heap, as bench/dispatch.py's do: 1,000 asyncio workers do not fit
beside the coordinator on 2 cores), or with ``--procs 0`` as coroutines on the broker's own loop. Task
durations are drawn once from a fixed-seed log-normal distribution (sigma 0.6, clipped to [0.05, 8] ×
mean); a worker looks its task's duration up by job and frame. Outputs name one tiny blob stored
beforehand (no blob transfer).

Printed: completions/s; assignment latency p50/p99/max (a slot becoming free, i.e. READY sent, to its
TASK arriving); makespan (go to the last ACK) against the ideal makespan, max(total work ÷ slots,
longest task), and their ratio (goal ≥ 0.95); the coordinator's step count and busy share. The database
is checked afterwards as in bench/dispatch.py (each task accepted exactly once).

Before that, the **fixed cost of a step with many idle connections** (``--idle``): ``Coordinator.step``
driven directly (no sockets), one busy worker completing a task a step (RESULT + READY) beside K
connected idle workers whose heartbeats arrive at their real rate on a simulated clock (2 ms a step),
K = 0, 100, 1,000 side by side: step CPU per step and its ratio to K = 0. ``--profile-idle`` prints
what a step at the largest K spends its time on.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import heapq
import io
import logging
import math
import multiprocessing
import pstats
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.databases import Backend, backends, stop_all  # noqa: E402
from bench.dispatch import OUTPUT, SCENE, Shared, Ticks, drain, tally, verify  # noqa: E402
from common import limits as L  # noqa: E402
from common import protocol as P  # noqa: E402
from farm import constants as C  # noqa: E402
from farm.core.coordinator import Coordinator  # noqa: E402
from farm.kinds import jobs as J  # noqa: E402
from farm.plane.broker import Broker, tune_gc  # noqa: E402
from farm.store.blobs import BlobStore  # noqa: E402
from farm.store.db import make_engine, session  # noqa: E402
from farm.web import auth  # noqa: E402

SIGMA = 0.6
HELLO_WAVE = 50  # HELLOs a worker process leaves unanswered at once while connecting
CLIP = (0.05, 8.0)  # durations are clipped to these multiples of the mean


def durations(n: int, mean: float, seed: int) -> list[float]:
    """``n`` task durations (seconds): log-normal with mean ``mean``, from a fixed seed."""
    rng = random.Random(seed)
    mu = math.log(mean) - SIGMA ** 2 / 2
    return [min(CLIP[1] * mean, max(CLIP[0] * mean, rng.lognormvariate(mu, SIGMA))) for _ in range(n)]


def setup(tmp: Path, tasks: int, url: str):
    """The farm's database and blobs with ``tasks`` one-frame tasks in jobs of at most MAX_TASKS_PER_JOB;
    returns (engine, blobs, output sha, [(job id, its task count)], {job id: its first task's index})."""
    engine = make_engine(url)
    blobs = BlobStore(tmp / "blobs")
    scene_sha, out_sha = blobs.write_bytes(SCENE), blobs.write_bytes(OUTPUT)
    made, offsets, start = [], {}, 0
    with session(engine) as s:
        owner, _ = auth.create_user(s, "bench", is_admin=True)
        s.commit()
        while start < tasks:
            n = min(C.MAX_TASKS_PER_JOB, tasks - start)
            job = J.create_blender_job(s, owner, blobs, {"scene_sha256": scene_sha, "frames": f"1-{n}", "chunk": 1,
                                                         "name": f"scale-{len(made)}"})
            s.commit()
            made.append((job.id, n))
            offsets[job.id] = start
            start += n
    return engine, blobs, out_sha, made, offsets


def fifo_makespan(length: list[float], slots: int) -> float:
    """The makespan of leasing the tasks in queue order (FIFO, as the coordinator does) to whichever slot
    frees first, with no cost at all per lease: what no coordinator can beat in this order. Against
    max(work ÷ slots, longest) it shows what the tail costs by itself (a long task leased last)."""
    free = [0.0] * slots
    for d in length:
        heapq.heapreplace(free, free[0] + d)
    return max(free)


@dataclass
class Stats:
    target: int
    acks: list[tuple[int, int]] = field(default_factory=list)
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)
    welcomed: int = 0
    t_go: float = 0.0
    t_done: float = 0.0
    all_welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def outputs(msg: P.Task, length: list[float], offset: int, out_sha: str) -> tuple[list[dict], float]:
    outs = [{"frame": f, "sha256": out_sha, "size": len(OUTPUT), "name": f"frame_{f:04d}.png",
             "seconds": length[offset + f - 1]} for f in msg.spec["frames"]]
    return outs, sum(o["seconds"] for o in outs)


# ---------------------------------------------------------------- workers as coroutines (--procs 0)
async def worker(ctx, endpoint: str, wid: str, slots: int, n_workers: int, length: list[float],
                 offsets: dict[int, int], out_sha: str, stats: Stats) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def send(msg) -> None:
        sock.send_multipart(P.encode(msg), flags=zmq.NOBLOCK)

    running: dict[tuple[int, int], asyncio.Task] = {}
    free_since: list[float] = []  # when each free slot became free (READY sent), oldest first

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(L.HEARTBEAT_INTERVAL)
            send(P.Heartbeat([list(k) for k in running]))

    async def run(msg: P.Task) -> None:
        key = (msg.task_id, msg.attempt)
        send(P.Progress(msg.task_id, msg.attempt, 0, 1, "inputs ready"))
        outs, seconds = outputs(msg, length, offsets[msg.job_id], out_sha)
        await asyncio.sleep(seconds)
        running.pop(key, None)
        send(P.Result(msg.task_id, msg.attempt, outs, seconds))
        free_since.append(time.perf_counter())
        send(P.Ready(slots - len(running)))

    hb = None
    try:
        send(P.Hello(wid, "", slots, {"runtimes": ["blender"], "hostname": "scale"}))
        while not isinstance(P.decode(await sock.recv_multipart()), P.Welcome):
            pass
        hb = asyncio.ensure_future(heartbeat())
        stats.welcomed += 1
        if stats.welcomed == n_workers:
            stats.all_welcomed.set()
        await stats.go.wait()
        free_since.extend([time.perf_counter()] * slots)
        send(P.Ready(slots))
        while True:
            msg = P.decode(await sock.recv_multipart())
            if isinstance(msg, P.Task):
                stats.latencies.append(time.perf_counter() - free_since.pop(0))
                running[(msg.task_id, msg.attempt)] = asyncio.ensure_future(run(msg))
            elif isinstance(msg, P.Ack):
                if not msg.accepted:
                    stats.rejected += 1
                stats.acks.append((msg.task_id, msg.attempt))
                if len(stats.acks) == stats.target:
                    stats.t_done = time.perf_counter()
                    stats.done.set()
            elif isinstance(msg, (P.Disconnect, P.Error)):
                raise RuntimeError(f"worker {wid} got {msg}")
    finally:
        for t in [hb, *running.values()]:
            if t is not None:
                t.cancel()
        sock.close(0)


# ---------------------------------------------------------------- workers in child processes (--procs K)
def _proc(endpoint: str, ids: list[str], slots: int, length: list[float], offsets: dict[int, int], out_sha: str,
          shared: Shared, go, stop, ready_q, result_q) -> None:
    """Some of the workers, in a child process: the protocol of :func:`worker`, message for message, for
    all of them from one ``zmq.Poller`` loop; running tasks wait in a timer heap instead of a coroutine
    each (a few hundred coroutines and asyncio sockets per process would be the larger load beside the
    coordinator on this machine)."""
    logging.basicConfig(level=logging.WARNING)
    ctx = zmq.Context()
    nb = int(zmq.NOBLOCK)
    acks, latencies, error = [], [], ""
    try:
        socks, index = [], {}
        poller = zmq.Poller()
        for wid in ids:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            poller.register(sock, zmq.POLLIN)
            index[sock] = len(socks)
            socks.append(sock)
        waiting, deadline = set(socks), time.monotonic() + 180
        unsent = list(zip(ids, socks))
        next_hb = time.monotonic() + L.HEARTBEAT_INTERVAL

        def idle_heartbeats() -> None:  # a thousand HELLOs take seconds: the first must not go silent meanwhile
            nonlocal next_hb
            if time.monotonic() >= next_hb:
                next_hb = time.monotonic() + L.HEARTBEAT_INTERVAL
                for sock in socks:
                    if sock not in waiting:  # welcomed
                        sock.send_multipart(P.encode(P.Heartbeat([])), nb)
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} workers not welcomed in 180 s")
            # HELLO in waves of HELLO_WAVE unanswered at a time: a thousand at once keep the coordinator busy
            # for seconds (a HELLO reads and writes its Worker row), and the first ones then miss heartbeats
            while unsent and len(waiting) - len(unsent) < HELLO_WAVE:
                wid, sock = unsent.pop(0)
                sock.send_multipart(P.encode(P.Hello(wid, "", slots, {"runtimes": ["blender"], "hostname": "scale"})), nb)
            for sock, _ in poller.poll(200):
                while True:
                    try:
                        frames = sock.recv_multipart(flags=nb)
                    except zmq.Again:
                        break
                    if isinstance(P.decode(frames), P.Welcome):
                        waiting.discard(sock)
            idle_heartbeats()
        ready_q.put(len(ids))
        while not go.wait(0.2):
            for _ in drain(poller, 0):  # HEARTBEATs from the coordinator: read and forgotten
                pass
            idle_heartbeats()
        running: list[dict[tuple[int, int], None]] = [{} for _ in socks]
        free_since: list[list[float]] = [[] for _ in socks]
        timers: list[tuple[float, int, int, P.Task]] = []  # (ends at, seq, socket index, task)
        seq = 0
        t0 = time.perf_counter()
        for i, sock in enumerate(socks):
            free_since[i].extend([t0] * slots)
            sock.send_multipart(P.encode(P.Ready(slots)), nb)
        ticks = Ticks(stop)
        while not ticks.stopped():
            if ticks.heartbeat_due():
                for i, sock in enumerate(socks):
                    sock.send_multipart(P.encode(P.Heartbeat([list(k) for k in running[i]])), nb)
            now = time.perf_counter()
            while timers and timers[0][0] <= now:
                _end, _seq, i, msg = heapq.heappop(timers)
                outs, seconds = outputs(msg, length, offsets[msg.job_id], out_sha)
                running[i].pop((msg.task_id, msg.attempt), None)
                sock = socks[i]
                sock.send_multipart(P.encode(P.Result(msg.task_id, msg.attempt, outs, seconds)), nb)
                free_since[i].append(time.perf_counter())
                sock.send_multipart(P.encode(P.Ready(slots - len(running[i]))), nb)
            wait = 50.0 if not timers else max(0.0, min(50.0, (timers[0][0] - time.perf_counter()) * 1000))
            acked = 0
            for sock, msg in drain(poller, wait):
                if isinstance(msg, P.Task):
                    i, now = index[sock], time.perf_counter()
                    latencies.append(now - free_since[i].pop(0))
                    running[i][(msg.task_id, msg.attempt)] = None
                    sock.send_multipart(P.encode(P.Progress(msg.task_id, msg.attempt, 0, 1, "inputs ready")), nb)
                    _outs, seconds = outputs(msg, length, offsets[msg.job_id], out_sha)
                    seq += 1
                    heapq.heappush(timers, (now + seconds, seq, i, msg))
                else:
                    acked += tally(msg, acks)
            if acked:
                shared.count(None, acked)
    except Exception as exc:  # noqa: BLE001  (reported to the parent)
        error = repr(exc)
    finally:
        result_q.put(([(t, a) for t, a, _ in acks], latencies, sum(not ok for *_, ok in acks), error))
        ctx.destroy(0)


async def drive_procs(endpoint: str, args, length, offsets, out_sha: str, stats: Stats, on_go) -> None:
    mp = multiprocessing.get_context("spawn")
    shared = Shared(mp.Value("q", 0), mp.Value("d", 0.0), mp.Event(), args.tasks)
    go, stop, ready_q, result_q = mp.Event(), mp.Event(), mp.Queue(), mp.Queue()
    ids = [f"scale-{i:04d}" for i in range(args.workers)]
    children = [mp.Process(target=_proc, daemon=True, args=(endpoint, ids[i::args.procs], args.slots, length, offsets,
                                                            out_sha, shared, go, stop, ready_q, result_q))
                for i in range(min(args.procs, args.workers))]
    for c in children:
        c.start()
    errors = []
    try:
        for _ in children:
            await asyncio.to_thread(ready_q.get, True, 180)
        on_go()
        stats.t_go = time.perf_counter()
        go.set()
        ideal = max(sum(length) / (args.workers * args.slots), max(length))
        while not await asyncio.to_thread(shared.done.wait, 1.0):
            if time.perf_counter() - stats.t_go > ideal * 3 + 120 or not all(c.is_alive() for c in children):
                break
        if not shared.done.is_set():
            raise RuntimeError(f"timed out with {shared.total.value}/{args.tasks} completions")
        stats.t_done = shared.t_done.value
    finally:
        stop.set()
        for _ in children:
            acks, lat, rejected, error = await asyncio.to_thread(result_q.get, True, 60)
            stats.acks += acks
            stats.latencies += lat
            stats.rejected += rejected
            errors += [error] if error else []
        for c in children:
            await asyncio.to_thread(c.join, 30)
        if errors:
            print(f"  worker processes failed: {errors}", flush=True)
    if errors:
        raise RuntimeError(f"worker processes failed: {errors}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------- the fixed cost of a step beside idle connections
def idle_cost(k: int, steps: int, dt: float = 0.002, profile: bool = False):
    """CPU seconds of ``Coordinator.step`` per step with ``k`` idle connected workers beside one busy one (a
    RESULT + READY a step), driven directly on a simulated clock; the idle workers' heartbeats arrive at
    their real rate (k per HEARTBEAT_INTERVAL), and the broker's heartbeats to every connection
    (``Coordinator.heartbeats``, encoded) are counted in. Returns (CPU per step, profile or None)."""
    from bench.dispatch import answer
    with tempfile.TemporaryDirectory(prefix="rh-idle-") as d:
        engine, blobs, out_sha, _made, _ = setup(Path(d), steps + 10, f"sqlite:///{Path(d) / 'farm.db'}")
        coord = Coordinator(engine, blobs, verify=False)
        now = 1_000_000.0

        def frames(ident: bytes, msg) -> list[bytes]:
            return [ident, *P.encode(msg)]
        caps = {"runtimes": ["blender"], "hostname": "idle"}
        idle = [f"idle-{i:05d}".encode() for i in range(k)]
        for i in range(0, k, 256):
            coord.step([frames(x, P.Hello(x.decode(), "", 1, caps)) for x in idle[i:i + 256]], now)
        busy = b"busy"
        coord.step([frames(busy, P.Hello("busy", "", 1, caps))], now)
        out = coord.step([frames(busy, P.Ready(1))], now)
        prof = cProfile.Profile() if profile else None
        hb_due, hb_next, sent_hb = 0.0, 0, now + L.HEARTBEAT_INTERVAL
        cpu = 0.0
        for _ in range(steps):
            task = next(m for ident, m in out if ident == busy and isinstance(m, P.Task))
            batch = [frames(busy, m) for m in answer(task, out_sha, len(OUTPUT))]
            hb_due += k * dt / L.HEARTBEAT_INTERVAL  # idle workers' heartbeats at their real rate
            while hb_due >= 1:
                hb_due -= 1
                batch.append(frames(idle[hb_next % k], P.Heartbeat([])))
                hb_next += 1
            c0 = time.thread_time()
            if prof:
                prof.enable()
            out = coord.step(batch, now)
            if now >= sent_hb:  # what the broker adds every HEARTBEAT_INTERVAL: one HEARTBEAT to every connection
                sent_hb = now + L.HEARTBEAT_INTERVAL
                for _ident, m in coord.heartbeats():
                    P.encode(m)
            if prof:
                prof.disable()
            cpu += time.thread_time() - c0
            now += dt
        if len(coord.conns) != k + 1:
            raise AssertionError(f"{k + 1 - len(coord.conns)} workers were dropped during the idle measurement")
        engine.dispose()
    return cpu / steps, prof


def print_idle(ks: list[int], steps: int, rounds: int, profile: bool) -> None:
    print(f"fixed cost of a step beside idle connections: Coordinator.step driven directly (SQLite), one task "
          f"completed a step, {steps} steps × {rounds} rounds alternating, medians", flush=True)
    got: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            got[k].append(idle_cost(k, steps)[0])
    base = statistics.median(got[ks[0]])
    print(f"{'idle connections':>17} {'step CPU':>10} {'ratio':>7}")
    for k in ks:
        med = statistics.median(got[k])
        print(f"{k:>17} {med * 1e6:>7.0f} µs {med / base:>7.2f}")
    if profile:
        _, prof = idle_cost(ks[-1], steps, profile=True)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        lines = buf.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
        print(f"--- a step beside {ks[-1]} idle connections, top 18 by own time")
        print("\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:] if line.strip()))
    print(flush=True)


# ---------------------------------------------------------------- the run
async def run(args, backend: Backend) -> None:
    length = durations(args.tasks, args.mean, args.seed)
    slots_total = args.workers * args.slots
    ideal = max(sum(length) / slots_total, max(length))
    where = f"in {args.procs} child processes" if args.procs else "on the broker's loop"
    print(f"scale benchmark on {backend.label}: {args.workers} workers × {args.slots} slot(s) {where}, {args.tasks} "
          f"tasks, durations log-normal (mean {statistics.mean(length):.3f} s, median {statistics.median(length):.3f} "
          f"s, max {max(length):.2f} s, seed {args.seed}); ideal makespan {ideal:.2f} s; real broker + coordinator, "
          f"{backend.settings()}; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rh-scale-") as d, backend.fresh(Path(d)) as url:
        t = time.perf_counter()
        engine, blobs, out_sha, made, offsets = setup(Path(d), args.tasks, url)
        print(f"  {len(made)} job(s) of at most {C.MAX_TASKS_PER_JOB} tasks stored in {time.perf_counter() - t:.1f} s",
              flush=True)
        coord = Coordinator(engine, blobs, verify=False)  # the results are stand-in bytes, not pictures
        busy = {"steps": 0, "seconds": 0.0, "cpu": 0.0, "msgs": 0}
        step = coord.step

        prof = cProfile.Profile() if args.profile else None

        def timed_step(batch, now=None):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = prof.runcall(step, batch, now) if prof else step(batch, now)
            busy["seconds"] += time.perf_counter() - t0
            busy["cpu"] += time.thread_time() - c0
            busy["steps"] += 1
            busy["msgs"] += len(batch)
            return out
        coord.step = timed_step
        ctx = zmq.asyncio.Context()
        broker = Broker(coord, "tcp://127.0.0.1:0", ctx=ctx)
        server = asyncio.ensure_future(broker.run())
        stats = Stats(args.tasks)
        ws = []
        try:
            endpoint = await broker.ready()
            t = time.perf_counter()
            if args.procs:
                await drive_procs(endpoint, args, length, offsets, out_sha, stats,
                                  on_go=lambda: busy.update(steps=0, seconds=0.0, cpu=0.0, msgs=0))
            else:
                ws = [asyncio.ensure_future(worker(ctx, endpoint, f"scale-{i:04d}", args.slots, args.workers, length,
                                                   offsets, out_sha, stats)) for i in range(args.workers)]
                await asyncio.wait_for(stats.all_welcomed.wait(), 120)
                busy.update(steps=0, seconds=0.0, cpu=0.0, msgs=0)
                stats.t_go = time.perf_counter()
                stats.go.set()
                done = asyncio.ensure_future(stats.done.wait())
                finished, _ = await asyncio.wait([done, server, *ws], return_when=asyncio.FIRST_COMPLETED,
                                                 timeout=ideal * 3 + 120)
                if done not in finished:
                    for f in finished:
                        f.result()  # a worker or the broker died: raise its error
                    raise RuntimeError(f"timed out with {len(stats.acks)}/{args.tasks} completions")
            print(f"  {args.workers} workers connected in {stats.t_go - t:.1f} s", flush=True)
        finally:
            for w in ws:
                w.cancel()
            await asyncio.gather(*ws, return_exceptions=True)
            broker.stop()
            await asyncio.gather(server, return_exceptions=True)
            ctx.destroy(0)
        checked = [verify(engine, job_id, n, None) for job_id, n in made]
        if stats.rejected or len(set(stats.acks)) != len(stats.acks) or len(stats.acks) != args.tasks:
            raise AssertionError(f"{len(stats.acks)} ACKs, {len(set(stats.acks))} distinct, {stats.rejected} "
                                 f"rejected, want {args.tasks} distinct accepted")
        engine.dispose()
    makespan = stats.t_done - stats.t_go
    fifo = fifo_makespan(length, slots_total)
    lat = stats.latencies
    print(f"  checked: {args.tasks} ACKs distinct and accepted; per job: " + "; ".join(checked))
    print()
    print(f"{'database':>10} {'completions/s':>14} {'makespan s':>11} {'ideal s':>8} {'efficiency':>11} "
          f"{'FIFO bound':>11} {'÷ FIFO':>7} "
          f"{'latency p50':>12} {'p99':>8} {'max':>9} {'steps':>7} {'msgs/step':>10} {'step busy':>10} "
          f"{'step CPU/task':>14}")
    print(f"{backend.label:>10} {args.tasks / makespan:>14.0f} {makespan:>11.2f} {ideal:>8.2f} {ideal / makespan:>11.3f} "
          f"{ideal / fifo:>11.3f} {fifo / makespan:>7.3f} "
          f"{pct(lat, 0.5) * 1000:>9.1f} ms {pct(lat, 0.99) * 1000:>5.1f} ms {max(lat) * 1000:>6.1f} ms "
          f"{busy['steps']:>7} {busy['msgs'] / max(1, busy['steps']):>10.1f} {busy['seconds'] / makespan:>10.0%} "
          f"{busy['cpu'] / args.tasks * 1000:>11.2f} ms")
    print("efficiency = ideal ÷ makespan (ideal = max(total task seconds ÷ slots, longest task)); FIFO bound = ideal "
          f"÷ the makespan of leasing in queue order at no cost ({fifo:.2f} s: the tail's own cost); ÷ FIFO = that "
          "makespan ÷ the measured one (the coordinator's and the harness's cost alone); latency: a slot "
          f"freed (READY sent) to its TASK arriving, {len(lat)} assignments; step busy: share of the makespan the "
          "coordinator thread spent in Coordinator.step")
    print(f"efficiency goal ≥ {args.goal}: {'met' if ideal / makespan >= args.goal else 'NOT met'}", flush=True)
    if prof:
        for order, only in (("tottime", None), ("cumulative", str(ROOT / "farm"))):
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf).sort_stats(order)
            st.print_stats(*([only] if only else []), 20)
            lines = buf.getvalue().splitlines()
            start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
            print(f"--- the coordinator's step under the profiler, top 20 by {order}{' (project code)' if only else ''}")
            print("\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:] if line.strip()))


async def main_async(args) -> int:
    if args.idle:
        print_idle([int(x) for x in args.idle.split(",")], args.idle_steps, args.idle_rounds, args.profile_idle)
    if args.tasks == 0:
        return 0
    dbs = backends(args.db)
    try:
        for b in dbs:
            await run(args, b)
            print()
    finally:
        stop_all(dbs)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1,000 workers, 5,000 tasks of 2 s on average, a shorter idle measurement (< 60 s)")
    ap.add_argument("--workers", type=int, default=1000, help="simulated workers (default 1000)")
    ap.add_argument("--procs", type=int, default=2, help="child processes running the workers (default 2; 0: on the "
                                                         "broker's loop, as coroutines)")
    ap.add_argument("--slots", type=int, default=1, help="slots per worker")
    ap.add_argument("--tasks", type=int, default=None, help="tasks (default 100000, quick 5000; 0: the idle "
                                                            "measurement only)")
    ap.add_argument("--mean", type=float, default=None, help="mean task seconds (default 3.0, quick 2.0)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the task durations")
    ap.add_argument("--goal", type=float, default=0.95, help="efficiency to report against")
    ap.add_argument("--db", default="sqlite", help="databases, one run each: sqlite, pg, a postgresql:// URL "
                                                    "(bench/databases.py)")
    ap.add_argument("--idle", default="0,100,1000", help="idle connection counts of the fixed-cost measurement "
                                                         "('' to skip it)")
    ap.add_argument("--idle-steps", type=int, default=None, help="steps per idle measurement (default 2000, quick 500)")
    ap.add_argument("--idle-rounds", type=int, default=None, help="rounds of it (default 3, quick 1)")
    ap.add_argument("--profile", action="store_true", help="profile the coordinator's step during the run")
    ap.add_argument("--profile-idle", action="store_true", help="profile a step beside the most idle connections")
    args = ap.parse_args()
    args.tasks = args.tasks if args.tasks is not None else (5000 if args.quick else 100_000)
    args.mean = args.mean or (2.0 if args.quick else 3.0)
    args.idle_steps = args.idle_steps or (500 if args.quick else 2000)
    args.idle_rounds = args.idle_rounds or (1 if args.quick else 3)
    logging.basicConfig(level=logging.WARNING)
    tune_gc()  # as farm serve does once started
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
