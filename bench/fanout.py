"""Blob fan-out: one big scene fetched by 8 worker daemons at once, against a plain HTTP download.

    python bench/fanout.py [--quick] [--size MiB] [--workers N] [--repeat R] [--plain] [--keep]

One blob of random bytes (default 1 GiB; ``--quick`` 128 MiB) stored in a coordinator's blob store, then
side by side, alternating which goes first in each round:

a. **farm**: a coordinator process (the real :class:`farm.plane.broker.Broker` + :class:`Coordinator`,
   SQLite file, CurveZMQ as ``farm serve`` has it; ``--plain`` for plain ZMTP) and N worker processes, each
   a real :class:`worker.daemon.WorkerDaemon` connection loop (``_session``) holding a lease of a task whose
   input is the blob (a worker fetches only the inputs of its leases: ``Coordinator._may_fetch``). On "go"
   every worker runs ``WorkerDaemon.fetch`` (BLOB_GET with credit or the sealed channel, write to the
   partial file, check, move into the cache; a sealed download is checked against the BLAKE3 digest its
   ticket carried, a chunked one against its sha256).
b. **http**: a stdlib ``http.server`` process serving the same file (``socket.sendfile``: zero-copy, the
   strictest baseline) and N client processes, each an ``http.client`` GET written to a file, then the
   file's sha256 checked: what a plain HTTP download must do before it trusts the bytes (nothing on
   the wire is authenticated; the name is the only check it has).

Printed per run: wall time (first start to last verified file), bytes received, throughput, the serving
process's CPU seconds (user + system, from /proc) and per-worker sha256 verification; then the ratio of
farm to HTTP throughput (goal >= 0.8) and farm coordinator CPU against the HTTP server's. The coordinator's
counters (chunks served, BLOB_GETs dropped by the credit bounds) are printed after each farm run.
Child roles (``_coordinator``, ``_worker``, ``_httpd``, ``_client``) are this script run again.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable
CHUNK = 4 << 20  # the HTTP client's read size
TAG = "@fanout "


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def file_sha(path: Path) -> str:
    from common.hashing import file_sha256
    return file_sha256(path)


def say(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")  # the daemon prints its own lines too
    sys.stdout.flush()


# ------------------------------------------------------------------ child roles
def apply_settings() -> None:
    """``--set MODULE.NAME=VALUE`` (in FANOUT_SET): measure a knob (chunk cache, credit) in the farm's
    processes without editing code, e.g. ``farm.store.blobs.READ_CACHE_BYTES=0``."""
    import importlib
    for item in filter(None, os.environ.get("FANOUT_SET", "").split(";")):
        name, _, value = item.partition("=")
        mod, _, attr = name.rpartition(".")
        module = importlib.import_module(mod)
        setattr(module, attr, type(getattr(module, attr))(float(value)))


def role_coordinator(data: str, plain: bool, sealed: bool) -> None:
    """A broker + coordinator on a random loopback port. stdin: ``lease WID SHA`` (a task leased to WID
    whose input is SHA, written on the coordinator's thread), ``stats``, ``quit``."""
    from farm.core.coordinator import Coordinator
    from farm.plane import gate
    from farm.plane.broker import Broker, tune_gc
    from farm.store.blobs import BlobStore
    from farm.store.db import make_engine, session
    from farm.store.models import Job, Task
    from farm.web import auth

    apply_settings()
    root = Path(data)
    engine = make_engine(f"sqlite:///{root / 'farm.db'}")
    blobs = BlobStore(root / "blobs")
    keyring = None if plain else gate.Keyring(root, "open")
    from farm.plane.sealed_http import SealedServer
    from farm.store.sealed import SealedChannel
    channel = SealedChannel(blobs) if sealed else None
    coord = Coordinator(engine, blobs, sealed=channel)
    with session(engine) as s:
        owner, _ = auth.create_user(s, f"fanout-{os.getpid()}")  # one database for every round
        s.commit()
        owner_id = owner.id

    def lease(worker_id: str, sha: str) -> int:
        with session(engine) as s:
            job = Job(owner_id=owner_id, kind="blender", spec={}, tasks_total=1)
            s.add(job)
            s.flush()
            task = Task(job_id=job.id, index=0, kind="render", spec={}, inputs=[sha], status="assigned",
                        attempt=1, worker_id=worker_id, lease_expires=time.time() + 3600)
            s.add(task)
            s.commit()
            return task.id

    prof = None
    if os.environ.get("FANOUT_PROFILE"):  # --profile: the step thread's and the loop's time, by function
        import cProfile
        import pstats
        prof, loop_prof = cProfile.Profile(time.thread_time), cProfile.Profile(time.thread_time)  # CPU, not wall
        step = coord.step

        def profiled_step(batch, now=None):
            prof.enable()
            try:
                return step(batch, now)
            finally:
                prof.disable()
        coord.step = profiled_step

    async def main() -> None:
        broker = Broker(coord, "tcp://127.0.0.1:0", keyring=keyring)
        if prof is not None:
            send = broker._send

            async def profiled_send(out):
                loop_prof.enable()
                try:
                    await send(out)
                finally:
                    loop_prof.disable()
            broker._send = profiled_send
        task = asyncio.create_task(broker.run())
        endpoint = await broker.ready()
        server = SealedServer(channel, "127.0.0.1", 0) if channel else None
        if server:
            await server.start()
        tune_gc()
        say({"endpoint": endpoint, "server_key": keyring.server_key if keyring else ""})
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            if line[0] == "lease":
                if channel and os.environ.get("FANOUT_PRESEAL") and not (channel.dir / line[2]).exists():
                    sealing = channel.acquire(line[2], blobs.size(line[2]))  # sealed before "go"
                    while not sealing.complete:
                        await asyncio.sleep(0.01)
                say({"task": await broker.call(lease, line[1], line[2])})
            elif line[0] == "stats":
                say({"stats": {**coord.stats, **(channel.stats if channel else {})}})
        broker.stop()
        await task
        if server:
            await server.stop()
            channel.close()

    asyncio.run(main())
    if prof is not None:
        for name, p in (("step thread", prof), ("broker sends", loop_prof)):
            print(f"--- {name}", file=sys.stderr)
            pstats.Stats(p, stream=sys.stderr).sort_stats("tottime").print_stats(18)


def role_worker(endpoint: str, server_key: str, cache: str, worker_id: str, sha: str) -> None:
    """A WorkerDaemon's connection loop; after WELCOME says so, waits for ``go`` on stdin, fetches."""
    from worker.daemon import WorkerDaemon
    apply_settings()

    async def main() -> None:
        d = WorkerDaemon(endpoint, Path(cache), worker_id=worker_id, sandbox=False,
                         server_key=server_key.encode() if server_key else None)
        d.ready_info = {}
        d._start_task = lambda msg: None  # only fetches here; no task is offered anyway (no queued job)
        session = asyncio.create_task(d._session())
        while not d.stats["welcomes"]:
            if session.done():
                raise SystemExit(f"worker {worker_id}: session ended before WELCOME")
            await asyncio.sleep(0.01)
        say({"welcomed": worker_id})
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        prof = None
        if os.environ.get("FANOUT_PROFILE") and worker_id.endswith("-0"):  # one worker's CPU, by function
            import cProfile
            prof = cProfile.Profile(time.process_time)
            prof.enable()
        t0, c0 = time.monotonic(), cpu_seconds(os.getpid())
        path = await d.fetch(sha)
        t1, c1 = time.monotonic(), cpu_seconds(os.getpid())
        if prof is not None:
            import pstats
            prof.disable()
            print(f"--- worker {worker_id} (CPU seconds)", file=sys.stderr)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
        got = await asyncio.to_thread(file_sha, path)  # after the clock: the fetch checked it already
        say({"t0": t0, "t1": t1, "bytes": d.stats["bytes_downloaded"], "sha_ok": got == sha, "cpu": c1 - c0,
             "sealed": d.stats["bytes_sealed"]})
        d.stop()
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)

    asyncio.run(main())


def role_httpd(path: str) -> None:
    """Serve ``path`` at any GET with socket.sendfile, many connections at once (one thread each)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    size = os.path.getsize(path)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(path, "rb") as f:
                self.wfile.flush()
                self.connection.sendfile(f)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    say({"port": srv.server_address[1]})
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    sys.stdin.readline()
    srv.shutdown()


def role_client(port: int, out: str, sha: str) -> None:
    import http.client
    say({"ready": True})
    sys.stdin.readline()
    t0, c0 = time.monotonic(), cpu_seconds(os.getpid())
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/blob")
    resp = conn.getresponse()
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(out, "wb") as f:
        while k := resp.readinto(buf):
            f.write(view[:k])
            n += k
    ok = file_sha(Path(out)) == sha  # as the worker does: the whole file hashed once it is written
    t1, c1 = time.monotonic(), cpu_seconds(os.getpid())
    say({"t0": t0, "t1": t1, "bytes": n, "sha_ok": ok, "cpu": c1 - c0})


# ------------------------------------------------------------------ the parent
class Child:
    def __init__(self, *args: str, env: dict | None = None):
        self.p = subprocess.Popen([PY, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=ROOT, env={**os.environ, **(env or {})})

    def read(self, timeout: float = 120) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise SystemExit(f"child {self.p.args[2:4]} exited ({self.p.wait()})")
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])

    def write(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def close(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def finish(kind: str, clients: list[Child], server: Child, t_go: float, cpu0: float, size: int) -> dict:
    results = [c.read() for c in clients]
    cpu = cpu_seconds(server.p.pid) - cpu0
    t_start = min(r["t0"] for r in results)
    wall = max(r["t1"] for r in results) - t_start
    total = sum(r["bytes"] for r in results)
    ok = [r["sha_ok"] for r in results]
    client_cpu = statistics.median(r["cpu"] for r in results)
    return {"kind": kind, "wall": wall, "bytes": total, "mib_s": total / wall / 2**20, "server_cpu": cpu,
            "ok": ok, "client_cpu": client_cpu, "start_spread": max(r["t0"] for r in results) - t_start,
            "complete": all(r["bytes"] == size for r in results) or None}


def run_farm(tmp: Path, farm_dir: Path, sha: str, size: int, n: int, plain: bool, rnd: int, sealed: bool,
             warm: bool) -> dict:
    coord = Child("_coordinator", str(farm_dir), "1" if plain else "0", "1" if sealed else "0")
    workers: list[Child] = []
    try:
        info = coord.read()
        for i in range(n):
            cache = tmp / f"w{i}"
            shutil.rmtree(cache, ignore_errors=True)
            workers.append(Child("_worker", info["endpoint"], info["server_key"], str(cache),
                                 f"fan{rnd}{'s' if sealed else 'c'}-{i}", sha))
        for i, w in enumerate(workers):
            w.read()  # welcomed
            coord.write(f"lease fan{rnd}{'s' if sealed else 'c'}-{i} {sha}")  # a new id a run: its key is new too
            coord.read()
        coord.write("stats")
        before = coord.read()["stats"]
        if warm:
            warm_memory(tmp, size, n)
        cpu0 = cpu_seconds(coord.p.pid)
        t_go = time.monotonic()
        for w in workers:
            w.write("go")
        r = finish("sealed" if sealed else "chunks", workers, coord, t_go, cpu0, size)
        coord.write("stats")
        after = coord.read()["stats"]
        r["stats"] = {k: after.get(k, 0) - before.get(k, 0)
                      for k in ("chunks_out", "chunks_cached", "blob_gets_dropped", "steps_skipped", "tickets",
                                "streams", "bytes_sent", "sealed_bytes")}
        return r
    finally:
        for w in workers:
            w.close()
        if coord.p.poll() is None:
            coord.write("quit")
        coord.close()
        for i in range(n):
            shutil.rmtree(tmp / f"w{i}", ignore_errors=True)


def run_http(tmp: Path, blob: Path, sha: str, size: int, n: int, warm: bool) -> dict:
    httpd = Child("_httpd", str(blob))
    clients: list[Child] = []
    try:
        port = httpd.read()["port"]
        clients = [Child("_client", str(port), str(tmp / f"h{i}.bin"), sha) for i in range(n)]
        for c in clients:
            c.read()
        if warm:
            warm_memory(tmp, size, n)
        cpu0 = cpu_seconds(httpd.p.pid)
        t_go = time.monotonic()
        for c in clients:
            c.write("go")
        return finish("http", clients, httpd, t_go, cpu0, size)
    finally:
        for c in clients:
            c.close()
        if httpd.p.poll() is None:
            httpd.write("quit")
        httpd.close()
        for i in range(n):
            (tmp / f"h{i}.bin").unlink(missing_ok=True)


def warm_memory(tmp: Path, size: int, n: int) -> float:
    """Write and delete ``n`` files of ``size`` bytes in ``tmp``, right before every run's "go". This VM (Firecracker, ``Free page reporting enabled`` in dmesg) hands freed guest
    memory back to its host within seconds, and the next touch of such a page costs several times a write
    to a page freed just now (8 processes writing 512 MiB each to /dev/shm: 0.79 s of CPU each the first
    time, 0.15 s the next; 8 x 1 GiB written right after 8 GiB were deleted: 1.8-2.6 s of CPU each, 6 s
    after: 3.0-3.8 s). A run's downloads take their pages from what the run before it freed, so without
    this a run that starts slowly (the farm's: a coordinator and 8 worker daemons to start, several
    seconds) paid ~1 s of CPU a GiB a worker more than one that starts at once (the HTTP clients')."""
    t0 = time.monotonic()
    zeros = bytes(CHUNK)
    for i in range(n):
        with open(tmp / f"warm{i}", "wb") as f:
            f.writelines(zeros for _ in range(0, size, len(zeros)))
    for i in range(n):
        (tmp / f"warm{i}").unlink()
    return time.monotonic() - t0


def make_blob(farm_dir: Path, size: int) -> tuple[str, Path]:
    from farm.store.blobs import BlobStore
    store = BlobStore(farm_dir / "blobs")
    data = os.urandom(min(size, 64 << 20))
    h = hashlib.sha256()
    for off in range(0, size, len(data)):
        h.update(data[:size - off])
    sha = h.hexdigest()
    store.write_stream(sha, (data[:size - off] for off in range(0, size, len(data))))
    return sha, store.path(sha)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB, 1 round")
    ap.add_argument("--size", type=float, default=None, help="blob size in MiB (default 1024, quick 128)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=None, help="rounds of farm and http (default 3, quick 1)")
    ap.add_argument("--plain", action="store_true", help="plain ZMTP instead of CurveZMQ on the worker plane")
    ap.add_argument("--modes", default="sealed", help="the farm's ways, comma-separated, each run beside HTTP: "
                    "sealed (farm serve's default: big inputs over the sealed channel, sendfile of one "
                    "ciphertext), chunks (BLOB chunks over the worker plane, --sealed off)")
    ap.add_argument("--dir", default=None, help="where the blob and the downloads go (default /dev/shm when "
                    "it has room: a disk shared with other load measures the disk, not the transfer)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a numeric module constant in the coordinator and worker processes (repeatable)")
    ap.add_argument("--profile", action="store_true", help="cProfile the coordinator's step and sends "
                    "(printed by the coordinator process on stderr)")
    ap.add_argument("--no-warm", action="store_true", help="skip writing (and deleting) the downloads' worth "
                    "of files before every run (see warm_memory)")
    ap.add_argument("--preseal", action="store_true", help="sealed mode: seal the blob before the workers "
                    "start (the transport alone, as for a scene sealed before its fan-out); default: the first "
                    "download starts the sealing and all of them stream behind it")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.preseal:
        os.environ["FANOUT_PRESEAL"] = "1"
    size = int((args.size or (128 if args.quick else 1024)) * 2**20)
    rounds = args.repeat or (1 if args.quick else 3)
    base = args.dir
    if base is None and os.path.isdir("/dev/shm"):
        free = shutil.disk_usage("/dev/shm").free
        base = "/dev/shm" if free > size * (args.workers + 2) + (2 << 30) else None
    tmp = Path(tempfile.mkdtemp(prefix="rh-fanout-", dir=base))
    farm_dir = tmp / "farm"
    farm_dir.mkdir()
    print(f"fan-out: one {size / 2**20:.0f} MiB blob to {args.workers} workers at once, {rounds} round(s); "
          f"worker plane {'plain ZMTP' if args.plain else 'CurveZMQ'}; files in {tmp}; {os.cpu_count()} cores (shared with "
          "whatever else runs: ratios are side by side)", flush=True)
    sha, blob = make_blob(farm_dir, size)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"sealed", "chunks"}:
        ap.error("--modes: sealed and/or chunks")
    kinds = [*modes, "http"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    if args.profile:
        os.environ["FANOUT_PROFILE"] = "1"
    os.environ["FANOUT_SET"] = ";".join(args.set)
    if args.set:
        print(f"settings: {', '.join(args.set)}")
    try:
        for i in range(rounds):
            order = kinds if i % 2 == 0 else kinds[::-1]
            for kind in order:
                warm = not args.no_warm
                r = (run_http(tmp, blob, sha, size, args.workers, warm) if kind == "http"
                     else run_farm(tmp, farm_dir, sha, size, args.workers, args.plain, i, kind == "sealed", warm))
                runs[kind].append(r)
                st = r.get("stats", {})
                extra = (f"; chunks served {st['chunks_out']} ({st['chunks_cached']} from the cache without a "
                         f"step, {st['steps_skipped']} steps skipped), BLOB_GETs dropped {st['blob_gets_dropped']}"
                         if kind != "http" else "")
                if kind == "sealed":
                    extra += (f"; sealed {st['sealed_bytes'] / 2**20:.0f} MiB once, {st['tickets']} tickets, "
                              f"{st['streams']} downloads, {st['bytes_sent'] / 2**20:.0f} MiB sent by sendfile")
                print(f"  {kind:<4} {r['wall']:7.2f} s  {r['bytes'] / 2**20:8.0f} MiB  {r['mib_s']:7.0f} MiB/s  "
                      f"server CPU {r['server_cpu']:6.2f} s  client CPU {r['client_cpu']:5.2f} s (median)  "
                      f"verified {sum(r['ok'])}/{len(r['ok'])}{extra}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    h_mib, h_cpu = med(r["mib_s"] for r in runs["http"]), med(r["server_cpu"] for r in runs["http"])
    ok = all(all(r["ok"]) and r["complete"] for rs in runs.values() for r in rs)
    print()
    print(f"{'':<6} {'wall s':>8} {'MiB/s':>8} {'server CPU s':>13} {'CPU s / GiB':>12} {'client CPU s / GiB':>19}"
          f"   (median of {rounds}, alternating)")
    for kind in kinds:
        rs = runs[kind]
        gib = med(r["bytes"] for r in rs) / 2**30
        print(f"{kind:<6} {med(r['wall'] for r in rs):>8.2f} {med(r['mib_s'] for r in rs):>8.0f} "
              f"{med(r['server_cpu'] for r in rs):>13.2f} {med(r['server_cpu'] for r in rs) / gib:>12.2f} "
              f"{med(r['client_cpu'] for r in rs) / (size / 2**30):>19.2f}")
    for kind in modes:
        f_mib, f_cpu = med(r["mib_s"] for r in runs[kind]), med(r["server_cpu"] for r in runs[kind])
        print(f"throughput farm ({kind})/http = {f_mib / h_mib:.3f} (goal >= 0.8); coordinator CPU {f_cpu:.2f} s "
              f"vs the HTTP server's {h_cpu:.2f} s")
    print(f"per-worker sha256 verified: {'all' if ok else 'NOT ALL'}")
    if args.keep:
        print(f"kept {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "_coordinator":
            role_coordinator(rest[0], rest[1] == "1", rest[2] == "1")
        elif role == "_worker":
            role_worker(*rest)
        elif role == "_httpd":
            role_httpd(rest[0])
        elif role == "_client":
            role_client(int(rest[0]), rest[1], rest[2])
        sys.exit(0)
    sys.exit(main())
