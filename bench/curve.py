"""What CurveZMQ costs on the worker plane: plain ZMTP against CURVE, side by side in this one process.

    python bench/curve.py [--quick] [--repeat R] [--tasks T] [--n 1,10]

Two measurements, each run alternately plain and CURVE ``--repeat`` times, medians reported:

* **ping-pong**: a bare DEALER→ROUTER echo on tcp://127.0.0.1 (sync sockets, one thread each side), one
  message in flight: round trips a second for a 100-byte message (a control message: HEARTBEAT, READY,
  ACK) and MB/s for a 1 MiB one (a download chunk, BLOB_CHUNK_SIZE) and a 256 KiB one (an upload chunk,
  UPLOAD_CHUNK_SIZE). This is the crypto's own cost.
* **dispatch**: the real :class:`farm.plane.broker.Broker` + coordinator + SQLite of ``bench/dispatch.py``
  (N in-process workers, null tasks: READY→TASK, RESULT→ACK), once plain and once with a
  :class:`farm.plane.gate.Keyring` (CURVE server, the ZAP handler, the per-message gate) and CURVE clients.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.limits import BLOB_CHUNK_SIZE, UPLOAD_CHUNK_SIZE  # noqa: E402
from bench.dispatch import OUTPUT, BrokerHost, drive_workers, setup_farm, verify  # noqa: E402
from farm.core.coordinator import Coordinator  # noqa: E402
from farm.plane import gate as curve  # noqa: E402
from farm.plane.broker import Broker  # noqa: E402
from worker import keys  # noqa: E402


# ---------------------------------------------------------------- ping-pong
def ping_pong(secure: bool, size: int, seconds: float) -> float:
    """Round trips a second of one ``size``-byte message echoed by a ROUTER (one in flight)."""
    ctx = zmq.Context()
    server_pub, server_sec = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    if secure:  # no ZAP handler in this context: libzmq admits every client key
        router.curve_secretkey, router.curve_publickey, router.curve_server = server_sec, server_pub, True
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if router.poll(50):
                router.send_multipart(router.recv_multipart(copy=False), copy=False)
    t = threading.Thread(target=echo, daemon=True)
    t.start()
    dealer = ctx.socket(zmq.DEALER)
    if secure:
        keys.secure_client(dealer, server_pub, zmq.curve_keypair())
    dealer.connect(f"tcp://127.0.0.1:{port}")
    msg = b"x" * size
    for _ in range(20):  # handshake and warm-up
        dealer.send(msg)
        dealer.recv(copy=False)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dealer.send(msg, copy=size < 65536)
        dealer.recv(copy=False)
        n += 1
    rate = n / (time.perf_counter() - t0)
    stop.set()
    t.join()
    dealer.close(0)
    router.close(0)
    ctx.term()
    return rate


# ---------------------------------------------------------------- dispatch through the real broker
class CurveClients(zmq.asyncio.Context):
    """A context whose DEALER sockets are CURVE clients of ``server_key`` (bench/dispatch.py's workers
    make their sockets from the context they are given)."""
    server_key: bytes | None = None

    def socket(self, socket_type, *args, **kw):
        sock = super().socket(socket_type, *args, **kw)
        if socket_type == zmq.DEALER and self.server_key:
            keys.secure_client(sock, self.server_key, zmq.curve_keypair())
        return sock


async def dispatch(secure: bool, n: int, tasks: int) -> float:
    """Completions a second of ``tasks`` null tasks by ``n`` workers (durable: each ACK follows a commit)."""
    with tempfile.TemporaryDirectory(prefix="rh-curve-") as d:
        engine, blobs, _scene, out_sha, job_id = setup_farm(Path(d), tasks)
        coord = Coordinator(engine, blobs, verify=False)
        keyring = curve.Keyring(Path(d), "open") if secure else None
        ctx = CurveClients()
        ctx.server_key = keyring.public if keyring else None
        broker = Broker(coord, "tcp://127.0.0.1:0", ctx=ctx, keyring=keyring)
        host = BrokerHost(in_thread=False)
        try:
            endpoint = await host.start(broker.run, broker.ready)
            tally = await drive_workers(ctx, endpoint, n, tasks, out_sha, len(OUTPUT))
        finally:
            await host.stop(broker.stop)
            ctx.destroy(0)
        verify(engine, job_id, tasks, tally)
        engine.dispose()
        return tasks / (tally.t_done - tally.t_go)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--n", default="1,10")
    args = ap.parse_args()
    repeat = args.repeat or (3 if args.quick else 5)
    tasks = args.tasks or (300 if args.quick else 1000)
    seconds = 1.0 if args.quick else 2.0
    print(f"CurveZMQ overhead: plain vs CURVE alternating, {repeat} runs each, medians; pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}, curve={zmq.has('curve')}", flush=True)
    rows = []
    sizes = (("ping-pong 100 B (round trips/s)", 100),
             (f"ping-pong {BLOB_CHUNK_SIZE >> 10} KiB download chunk (MB/s)", BLOB_CHUNK_SIZE),
             (f"ping-pong {UPLOAD_CHUNK_SIZE >> 10} KiB upload chunk (MB/s)", UPLOAD_CHUNK_SIZE))
    for label, size in sizes:
        runs = {False: [], True: []}
        for _ in range(repeat):
            for secure in (False, True):
                rate = ping_pong(secure, size, seconds)
                runs[secure].append(rate * size / 1e6 if size > 1000 else rate)
        rows.append((label, runs))
    for n in (int(x) for x in args.n.split(",")):
        runs = {False: [], True: []}
        for _ in range(repeat):
            for secure in (False, True):
                runs[secure].append(asyncio.run(dispatch(secure, n, tasks)))
        rows.append((f"dispatch N={n}, {tasks} tasks (completions/s)", runs))
    print(f"\n{'measure':<44} {'plain':>10} {'CURVE':>10} {'CURVE/plain':>12}")
    for label, runs in rows:
        plain, secure = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"{label:<44} {plain:>10.1f} {secure:>10.1f} {secure / plain:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
