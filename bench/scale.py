"""Scale: many workers, many tasks of uneven length, through the real coordinator.

    python bench/scale.py [--quick] [--workers W] [--tasks T] [--mean S] [--slots K] [--seed N]

The real :class:`farm.plane.broker.Broker` + :class:`farm.core.coordinator.Coordinator` on a SQLite file (WAL,
synchronous=FULL, as ``farm serve`` runs it), one job of T one-frame tasks made by
:func:`farm.kinds.jobs.create_blender_job`, and W in-process DEALER workers on the broker's asyncio loop that
speak the protocol as ``farm worker`` does: HELLO, READY, then for each TASK a PROGRESS, a sleep of the
task's synthetic duration instead of a render, RESULT and at once READY again (the ACK clears the
outbox); HEARTBEAT every HEARTBEAT_INTERVAL listing the running tasks. Task durations are drawn once from
a fixed-seed log-normal distribution (sigma 0.6, clipped to [0.05, 8] × mean); the worker looks its task's
duration up by frame number. Outputs name one tiny blob stored beforehand (no blob transfer).

Printed: completions/s; assignment latency p50/p99/max (a slot becoming free, i.e. READY sent, to its
TASK arriving); makespan (go to the last ACK) against the ideal makespan, max(total work ÷ slots,
longest task), and their ratio (goal ≥ 0.95); the coordinator's step count and busy share. The database
is checked afterwards as in bench/dispatch.py (each task accepted exactly once).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
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

from bench.dispatch import OUTPUT, setup_farm, verify  # noqa: E402
from common import limits as C  # noqa: E402
from common import protocol as P  # noqa: E402
from farm.core.coordinator import Coordinator  # noqa: E402
from farm.plane.broker import Broker, tune_gc  # noqa: E402

SIGMA = 0.6
CLIP = (0.05, 8.0)  # durations are clipped to these multiples of the mean


def durations(n: int, mean: float, seed: int) -> list[float]:
    """``n`` task durations (seconds): log-normal with mean ``mean``, from a fixed seed."""
    rng = random.Random(seed)
    mu = math.log(mean) - SIGMA ** 2 / 2
    return [min(CLIP[1] * mean, max(CLIP[0] * mean, rng.lognormvariate(mu, SIGMA))) for _ in range(n)]


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


async def worker(ctx, endpoint: str, wid: str, slots: int, n_workers: int, length: list[float], out_sha: str,
                 stats: Stats) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def send(msg) -> None:
        sock.send_multipart(P.encode(msg), flags=zmq.NOBLOCK)

    running: dict[tuple[int, int], asyncio.Task] = {}
    free_since: list[float] = []  # when each free slot became free (READY sent), oldest first

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(C.HEARTBEAT_INTERVAL)
            send(P.Heartbeat([list(k) for k in running]))

    async def run(msg: P.Task) -> None:
        key = (msg.task_id, msg.attempt)
        send(P.Progress(msg.task_id, msg.attempt, 0, 1, "inputs ready"))
        seconds = sum(length[f - 1] for f in msg.spec["frames"])
        await asyncio.sleep(seconds)
        outs = [{"frame": f, "sha256": out_sha, "size": len(OUTPUT), "name": f"frame_{f:04d}.png",
                 "seconds": length[f - 1]} for f in msg.spec["frames"]]
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


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(args) -> int:
    length = durations(args.tasks, args.mean, args.seed)
    slots_total = args.workers * args.slots
    ideal = max(sum(length) / slots_total, max(length))
    print(f"scale benchmark: {args.workers} workers × {args.slots} slot(s), {args.tasks} tasks, durations "
          f"log-normal (mean {statistics.mean(length):.3f} s, median {statistics.median(length):.3f} s, max "
          f"{max(length):.2f} s, seed {args.seed}); ideal makespan {ideal:.2f} s; real broker + coordinator, "
          f"SQLite WAL synchronous=FULL; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rh-scale-") as d:
        t = time.perf_counter()
        engine, blobs, _scene, out_sha, job_id = setup_farm(Path(d), args.tasks)
        print(f"  job of {args.tasks} tasks stored in {time.perf_counter() - t:.1f} s", flush=True)
        coord = Coordinator(engine, blobs, verify=False)  # the results are stand-in bytes, not pictures
        busy = {"steps": 0, "seconds": 0.0, "cpu": 0.0, "msgs": 0}
        step = coord.step

        def timed_step(batch, now=None):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = step(batch, now)
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
            ws = [asyncio.ensure_future(worker(ctx, endpoint, f"scale-{i:04d}", args.slots, args.workers, length,
                                               out_sha, stats)) for i in range(args.workers)]
            await asyncio.wait_for(stats.all_welcomed.wait(), 60)
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
        finally:
            for w in ws:
                w.cancel()
            await asyncio.gather(*ws, return_exceptions=True)
            broker.stop()
            await asyncio.gather(server, return_exceptions=True)
            ctx.destroy(0)
        verified = verify(engine, job_id, args.tasks, stats)
        engine.dispose()
    makespan = stats.t_done - stats.t_go
    lat = stats.latencies
    print(f"  {verified}")
    print()
    print(f"{'completions/s':>14} {'makespan s':>11} {'ideal s':>8} {'efficiency':>11} {'latency p50':>12} "
          f"{'p99':>8} {'max':>8} {'steps':>7} {'msgs/step':>10} {'step busy':>10} {'step CPU/task':>14}")
    print(f"{args.tasks / makespan:>14.0f} {makespan:>11.2f} {ideal:>8.2f} {ideal / makespan:>11.3f} "
          f"{pct(lat, 0.5) * 1000:>9.1f} ms {pct(lat, 0.99) * 1000:>5.1f} ms {max(lat) * 1000:>5.1f} ms "
          f"{busy['steps']:>7} {busy['msgs'] / max(1, busy['steps']):>10.1f} {busy['seconds'] / makespan:>10.0%} "
          f"{busy['cpu'] / args.tasks * 1000:>11.2f} ms")
    print("efficiency = ideal ÷ makespan (ideal = max(total task seconds ÷ slots, longest task)); latency: a slot "
          f"freed (READY sent) to its TASK arriving, {len(lat)} assignments; step busy: share of the makespan the "
          "coordinator thread spent in Coordinator.step")
    print(f"efficiency goal ≥ {args.goal}: {'met' if ideal / makespan >= args.goal else 'NOT met'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50 workers, 2,000 tasks of 0.2 s on average (~15 s)")
    ap.add_argument("--workers", type=int, default=None, help="simulated workers (default 200, quick 50)")
    ap.add_argument("--slots", type=int, default=1, help="slots per worker")
    ap.add_argument("--tasks", type=int, default=None, help="tasks (default 20000, quick 2000)")
    ap.add_argument("--mean", type=float, default=None, help="mean task seconds (default 0.8, quick 0.2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the task durations")
    ap.add_argument("--goal", type=float, default=0.95, help="efficiency to report against")
    args = ap.parse_args()
    args.workers = args.workers or (50 if args.quick else 200)
    args.tasks = args.tasks or (2000 if args.quick else 20000)
    args.mean = args.mean or (0.2 if args.quick else 0.8)
    logging.basicConfig(level=logging.WARNING)
    tune_gc()  # as farm serve does once started
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
