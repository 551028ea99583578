"""``farm worker``: the GPU host's daemon. It never imports bpy or torch.

One asyncio loop owns one DEALER socket to the coordinator. Rendering happens in long-lived runtime child
processes (one per slot, :mod:`worker.runtimes.process`), so the loop keeps heart-beating while a frame renders.
Invariants:

* every message about a task carries the (task_id, attempt) of its lease; a CANCEL for it kills the
  child running it (the child is restarted lazily for the next task);
* a final RESULT/FAILED stays in the outbox until the coordinator ACKs it, and is re-sent after every
  reconnect, so a coordinator restart loses no finished work;
* inputs are fetched into the LRU cache (resumable, hash-verified) and outputs uploaded before RESULT;
* with prefetch (:mod:`worker.pipeline`) a slot holds one task more than it renders: the next one's
  inputs are fetched meanwhile, it renders the moment the slot's turn passes, and finished outputs upload
  while it renders; the worker never asks for more than ``slots × (1 + depth)`` leases;
* on silence from the coordinator for HEARTBEAT_LIVENESS intervals, or DISCONNECT, the socket is
  replaced and HELLO is sent again, with reconnect backoff 1 s → 32 s while the coordinator stays away;
* paused by its owner's rules (:mod:`worker.availability`: ``--schedule``, ``--idle-only``) it offers no
  slot (READY 0), answers TASK with RELEASE, finishes a running task within the grace or hands it back
  with RELEASE, and keeps heart-beating until the window opens again;
* with ``server_key`` (``farm worker`` always has one) the socket is a CURVE client pinned to that key
  (:mod:`worker.keys`): a failed handshake ends the session at once, with the reason logged, and nothing
  is sent in clear. Without one (in-process tests against a plain broker) it speaks plain ZMTP.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from common import limits as L
from common import model_folders, model_size
from common import protocol as P
from common.hashing import file_sha256
from worker import availability as avail
from worker import benchmark as bench
from worker import device_memory, keys
from worker import pipeline as pipe
from worker import sandbox as sandboxing
from worker import sealed_fetch
from worker import settings as C
from worker.blobcache import BlobCache
from worker.earnings import EarningsLog
from worker.runtimes.process import RuntimeCrashed, RuntimeProcess
from worker.tasks import project as project_files
from worker.tasks.executors import EXECUTORS, RUNTIMES, TaskContext, TaskFailure
from worker.transfer import Transfers

log = logging.getLogger("worker")


@dataclass
class Running:
    msg: P.Task
    slot: int
    job: asyncio.Task
    started: float = field(default_factory=time.monotonic)
    done: int = 0      # units finished so far (its last PROGRESS): whether it can finish within a pause's grace
    total: int = 0
    released: bool = False
    phase: str = pipe.WAITING  # waiting → rendering → uploading (worker.pipeline)
    pins: list[str] = field(default_factory=list)  # blobs pinned in the cache beyond its inputs (a project's files)


RECV_BATCH = 256
"""Messages taken off the socket after one poll (then the loop's own work: heartbeats, owner rules)."""


def _waiting(raw: zmq.Socket) -> list[list[bytes]]:
    """The messages waiting on ``raw`` (at most RECV_BATCH), read without blocking."""
    out = []
    while len(out) < RECV_BATCH:
        try:
            out.append(raw.recv_multipart(zmq.NOBLOCK, copy=False))  # a BLOB chunk is not copied (P.decode)
        except zmq.Again:
            break
    return out


def gpu_assignment(gpus: str, slots: int) -> list[str]:
    """The ``--gpus`` argument of each slot's Blender child: one GPU per slot when there are enough
    listed, else every slot sees the same set ("all", "none" or "0,1")."""
    ids = [g for g in gpus.split(",") if g.strip().isdigit()] if gpus not in ("all", "none") else []
    if slots > 1 and len(ids) >= slots:
        return ids[:slots]
    return [gpus] * slots


class WorkerDaemon:
    def __init__(self, coordinator: str, cache_dir: Path, slots: int = 1, wallet: str = "",
                 gpus: str = "all", worker_id: str | None = None, cache_bytes: int = C.WORKER_CACHE_BYTES,
                 models: list[Path] | None = None, benchmark: str = "auto", server_key: bytes | None = None,
                 enroll_token: str = "", sandbox: bool = True, limits: sandboxing.Limits | None = None,
                 availability: avail.Availability | None = None, prefetch: int = C.PREFETCH_DEPTH,
                 vram_limit: int | None = C.VRAM_LIMIT_BYTES or None):
        self.endpoint = coordinator
        self.dir = Path(cache_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = BlobCache(self.dir / "blobs", cache_bytes)
        self.slots = slots
        self.pipeline = pipe.Pipeline(slots, prefetch)  # slots' turns; one task more a slot with prefetch
        self.wallet = wallet
        self.id = worker_id or self._load_id()
        self.server_key = server_key
        self.keypair = keys.worker_keypair(self.dir) if server_key else None
        self.enroll_token = enroll_token
        self.gpu_args = gpu_assignment(gpus, slots)
        self.model_dirs = model_folders.configured_dirs() if models is None else [Path(m) for m in models]
        self.models: list[model_folders.ModelFolder] = []  # found, checked and hashed in start_runtimes
        self.runtimes: dict[tuple[str, int], RuntimeProcess] = {}  # (runtime name, slot) → child
        self.ready_info: dict[str, Any] = {}
        self.vram_limit = vram_limit  # caps the memory advertised (farm worker --vram-limit)
        self.devices: dict[int, str] = {}  # slot → torch device of its diffusion child ("cpu", "cuda:0")
        self.memory: dict[str, Any] = {}   # capabilities["memory"] (worker.device_memory), set in start_runtimes
        self.sizes: dict[str, dict[str, Any]] = {}  # model hash → its size figures (common.model_size)
        self.bench_mode = benchmark            # auto (cached when the key matches) | force | off
        self.benchmark: dict[str, Any] | None = None  # capabilities["benchmark"], see worker.benchmark
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.running: dict[tuple[int, int], Running] = {}
        self.outbox: dict[tuple[int, int], Any] = {}
        self.stopping = asyncio.Event()
        self.stats = {"bytes_downloaded": 0, "bytes_uploaded": 0, "tasks": 0, "reconnects": 0, "welcomes": 0}
        # fetches and uploads (BLOB, BLOB_ACK), big inputs over the sealed channel at the coordinator's host
        self.transfers = Transfers(self.cache, self.send, self.stats, sealed_fetch.endpoint_host(coordinator))
        # the OS sandbox of every runtime child (worker.sandbox); False only with --no-sandbox
        self.sandboxed = sandbox
        self.limits = limits or sandboxing.Limits()
        self.policies: dict[tuple[str, int], sandboxing.Policy] = {}
        self.sandbox_info = ""  # what probe() found, for the start-up line and HELLO
        self.availability = availability  # the owner's schedule / idle rule (None: always available)
        self.paused, self.paused_at = "", 0.0  # why the worker takes no work now ("" while it does)
        self.earnings = EarningsLog(self.id, self.dir, wallet)

    def _load_id(self) -> str:
        path = self.dir / "worker.id"
        if path.exists():
            return path.read_text().strip()
        wid = f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}"
        path.write_text(wid + "\n")
        return wid

    # ------------------------------------------------------------------ runtimes
    def runtime_dir(self, name: str, slot: int) -> Path:
        return self.dir / "runtime" / f"{name}-slot{slot}"

    def policy(self, name: str, slot: int) -> sandboxing.Policy | None:
        """The sandbox of the slot's ``name`` child (None with --no-sandbox)."""
        if not self.sandboxed:
            return None
        key = (name, slot)
        if key not in self.policies:
            readonly = []
            for m in self.models if name == "diffusion" else []:
                if m.ok:  # a hub snapshot's files link into the repo's blobs: the whole repo folder, then
                    readonly.append(m.path.parents[1] if m.path.parent.name == "snapshots" else m.path)
            uid = sandboxing.SANDBOX_UID_BASE + slot if os.geteuid() == 0 else None
            if uid is not None and not all(map(sandboxing.world_readable, readonly)):
                # model files only root may read (safetensors saves them 0600): this child keeps uid 0 in a
                # user namespace of its own, without any capability (see worker.sandbox)
                log.info("slot %d: model folders are readable by root only: their %s child runs as uid 0 in a "
                         "user namespace instead of uid %d", slot, name, uid)
                uid = None
            self.policies[key] = sandboxing.Policy(
                self.runtime_dir(name, slot), tuple(dict.fromkeys(readonly)), self.limits, uid=uid)
        return self.policies[key]

    def task_dir(self, name: str | None, slot: int, label: str) -> Path:
        """Where a task writes its outputs: inside the runtime child's own folder when a sandboxed child
        makes them (the only place it may write)."""
        if name is None or not self.sandboxed:
            return self.dir / "work" / label
        return self.runtime_dir(name, slot) / "out" / label

    def stage(self, name: str | None, slot: int, files: dict[str, Path]) -> dict[str, Path]:
        """The task's input files as the runtime child sees them: hard links in its read-only ``inputs``
        folder (the blob cache itself stays invisible); links of earlier tasks are removed first."""
        policy = self.policy(name, slot) if name else None
        if policy is None:
            return files
        policy.inputs.mkdir(parents=True, exist_ok=True)
        for old in policy.inputs.iterdir():
            if old.is_dir() and not old.is_symlink():  # a project tree a crashed task left (worker.tasks.project)
                project_files.remove(old)
            elif old.name not in files:
                old.unlink(missing_ok=True)
        staged = {}
        for key, src in files.items():
            dst = policy.inputs / key
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:  # another filesystem (or no hard links): a copy
                    shutil.copyfile(src, dst)
            staged[key] = dst
        return staged

    async def _runtime(self, slot: int, name: str = "blender") -> RuntimeProcess:
        """The slot's child of runtime ``name``, started (again) if it is not running."""
        rt = self.runtimes.get((name, slot))
        if rt is None or not rt.alive:
            module, args = RUNTIMES[name]
            rt = RuntimeProcess(module, args(self.gpu_args[slot]), self.runtime_dir(name, slot),
                                sandbox=self.policy(name, slot))
            info = await rt.start()
            if name == "blender":
                self.ready_info = self.ready_info or info
            elif name == "diffusion":
                self.devices[slot] = str((info or {}).get("device") or "cpu")
            self.runtimes[(name, slot)] = rt
        return rt

    async def start_runtimes(self) -> None:
        if self.sandboxed:
            self.sandbox_info = await asyncio.to_thread(sandboxing.probe)  # raises with what to install
            print(f"worker {self.id}: runtime children sandboxed ({self.sandbox_info}; memory "
                  f"{self.limits.memory_bytes / 1024**3:.1f} GiB, {self.limits.processes} threads)", flush=True)
        else:
            print("\n" + "!" * 100 + f"\nworker {self.id}: --no-sandbox: runtime children are NOT sandboxed. A "
                  "submitted scene or model can read\nthis machine's files (this worker's keys too), write "
                  "them and reach the network. Only for scenes you trust.\n" + "!" * 100 + "\n",
                  file=sys.stderr, flush=True)
        self.models = await asyncio.to_thread(model_folders.scan, self.model_dirs, self.dir / "model_hashes.json")
        for m in self.models:
            print(f"worker {self.id}: model {m.name} " + (f"({m.hash[:12]}) at {m.path}" if m.ok else
                                                           f"NOT USABLE: {m.error}"), flush=True)
        # with a model on disk the diffusion child starts now too: torch is imported once, not in a task
        names = ["blender"] + (["diffusion"] if any(m.ok for m in self.models) else [])
        await asyncio.gather(*(self._runtime(i, n) for i in range(self.slots) for n in names))
        self.sizes = await asyncio.to_thread(lambda: {m.hash: model_size.size_of(m.path, m.kind)
                                                      for m in self.models if m.ok})
        self.memory = await asyncio.to_thread(device_memory.advert, list(self.devices.values()),
                                              self.limits.memory_bytes, self.vram_limit)
        if self.devices:
            print(f"worker {self.id}: advertises {self.memory['bytes'] / 1024**3:.1f} GiB of "
                  f"{self.memory['device'].upper()} memory a task ({self.memory['source']})", flush=True)
        devices = self.ready_info.get("devices", [])
        print(f"worker {self.id}: Blender {self.ready_info.get('bpy_version')} ready in {self.slots} slot(s); "
              f"devices: {', '.join(d.get('type', '?') + ' ' + d.get('name', '') for d in devices) or 'CPU'}",
              flush=True)
        # before connecting: the score goes into HELLO (a cache hit costs nothing, a miss about a second)
        t0 = time.time()
        self.benchmark = await bench.measure_worker(self, self.bench_mode)
        if self.benchmark:
            how = "measured" if self.benchmark["measured_at"] >= t0 else "cached"
            print(f"worker {self.id}: benchmark " + ", ".join(
                f"{k} {v:.1f} work units/s" for k, v in self.benchmark.items() if k in ("blender", "diffusion"))
                + f" ({how})", flush=True)

    def capabilities(self) -> dict[str, Any]:
        return {"runtimes": sorted({name for name, _ in EXECUTORS.values() if name} | set(EXECUTORS)),
                "engines": self.ready_info.get("engines", []),
                "devices": self.ready_info.get("devices", []), "gpu": bool(self.ready_info.get("gpu")),
                "bpy": self.ready_info.get("bpy_version", ""), "hostname": socket.gethostname(),
                "cached": self.cache.hashes()[:1000],
                "models": [{**m.advert(), **({"size": self.sizes[m.hash]} if m.hash in self.sizes else {})}
                           for m in self.models],
                **({"memory": self.memory} if self.memory else {}),
                "sandbox": self.sandbox_info if self.sandboxed else "none", "prefetch": self.pipeline.depth,
                **({"benchmark": self.benchmark} if self.benchmark else {})}

    # ------------------------------------------------------------------ connection
    def send(self, msg: Any) -> None:
        if self.sock is not None:
            try:  # on the asyncio socket, not the plain one: a plain send while the session's poll waits can
                # take the edge that would have woken it (libzmq's FD is edge-triggered), a stall of up to 1 s
                self.sock.send_multipart(P.encode(msg), flags=zmq.NOBLOCK)
            except zmq.Again:
                log.debug("send queue full, dropped %s", type(msg).__name__)

    def _held(self) -> list[list[int]]:
        return [list(k) for k in {*self.running, *self.outbox}]

    def free_slots(self) -> int:
        return 0 if self.paused else self.pipeline.free(len(self.running))

    def _owner_rules(self, welcomed: bool) -> None:
        """Pause or resume by the owner's rules; while paused, hand back running tasks that cannot finish
        within the grace (their lease goes back without fault: RELEASE, not FAILED or BYE)."""
        why = self.availability.reason() if self.availability else ""
        if why and not self.paused:
            self.paused, self.paused_at = why, time.monotonic()
            print(f"worker {self.id}: paused, {why}: takes no new task"
                  + (f", finishing or handing back {len(self.running)} running" if self.running else ""), flush=True)
        elif not why and self.paused:
            self.paused = ""
            print(f"worker {self.id}: resumed: takes tasks again", flush=True)
        else:
            why = None  # no change
        if why is not None and welcomed:
            self.send(P.Ready(self.free_slots()))
        for key, run in list(self.running.items()) if self.paused else ():
            if not run.released and (run.phase == pipe.WAITING or avail.hand_back(  # one not begun: back now
                    time.monotonic(), self.paused_at, run.started, run.done, run.total, self.availability.grace)):
                run.released = True
                run.job.cancel()
                self.send(P.Release(*key, self.paused[:500]))
                print(f"worker {self.id}: handed task {key[0]}/{key[1]} back ({run.done}/{run.total} done): "
                      "it could not finish within the pause's grace", flush=True)

    async def run(self) -> None:
        await self.start_runtimes()
        backoff = C.RECONNECT_INITIAL
        try:
            while not self.stopping.is_set():
                welcomed = await self._session()
                if self.stopping.is_set():
                    break
                backoff = C.RECONNECT_INITIAL if welcomed else min(backoff * 2, C.RECONNECT_MAX)
                self.stats["reconnects"] += 1
                log.warning("lost the coordinator; reconnecting in %.0f s", backoff)
                try:
                    await asyncio.wait_for(self.stopping.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def _session(self) -> bool:
        """One socket's life. Returns True if it was welcomed (the coordinator was reachable)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        watch = None
        if self.server_key:
            keys.secure_client(sock, self.server_key, self.keypair)
            watch = keys.HandshakeWatch(sock, self.endpoint, self.keypair[0])
            poller.register(watch.socket, zmq.POLLIN)
        sock.connect(self.endpoint)
        self.sock = sock
        # the same libzmq socket without asyncio's futures, to drain what waits right after a poll (this
        # loop's thread only, never while the poll waits: see send)
        raw = zmq.Socket.shadow(sock.underlying)
        pending: collections.deque = collections.deque()  # messages received, not handled yet
        interval = L.HEARTBEAT_INTERVAL
        welcomed = False
        try:
            self.send(P.Hello(self.id, self.wallet, self.slots, self.capabilities(), self._held(),
                              enroll_token=self.enroll_token))
            last_recv = time.monotonic()
            next_hb = time.monotonic() + interval
            while not self.stopping.is_set():
                self._owner_rules(welcomed)
                now = time.monotonic()
                if now - last_recv > interval * L.HEARTBEAT_LIVENESS:
                    return welcomed
                if now >= next_hb:
                    if welcomed:
                        self.send(P.Heartbeat(self._held()))
                    next_hb = now + interval
                if pending:  # the fetch or upload just handed a chunk runs first: it asks for the next at once
                    await asyncio.sleep(0)
                ready = {} if pending else dict(await poller.poll(int(max(0.01, min(next_hb - now, interval)) * 1000)))
                if watch is not None and watch.socket in ready:
                    failure = await watch.drain()
                    if failure:  # libzmq would retry the handshake every 100 ms: back off instead
                        log.error("%s", failure)
                        return welcomed
                if not pending:
                    if sock not in ready:
                        continue
                    pending.extend(_waiting(raw))  # all that waits: one poll for a window of chunks
                    if not pending:
                        continue
                try:
                    msg = P.decode(pending.popleft())
                except P.ProtocolError as exc:
                    log.warning("malformed message from the coordinator: %s", exc)
                    continue
                last_recv = time.monotonic()
                if isinstance(msg, P.Welcome):
                    welcomed = True
                    self.stats["welcomes"] += 1  # the coordinator committed this HELLO (persist, then ack)
                    interval = msg.heartbeat_interval
                    self.transfers.welcome(msg.chunk_size, msg.credit)
                    print(f"worker {self.id}: connected to {self.endpoint}", flush=True)
                    for final in list(self.outbox.values()):
                        self.send(final)
                    self.send(P.Ready(self.free_slots()))
                elif isinstance(msg, P.Disconnect):
                    log.warning("coordinator asked to reconnect: %s", msg.reason)
                    return welcomed
                else:
                    self._dispatch(msg)
            self.send(P.Bye("worker shutting down"))
            return welcomed
        finally:
            self.sock = None
            if watch is not None:
                watch.close()
            sock.close(0)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, P.Task):
            self._start_task(msg)
        elif isinstance(msg, P.Cancel):
            run = self.running.get((msg.task_id, msg.attempt))
            if run:
                log.info("task %s/%s canceled: %s", msg.task_id, msg.attempt, msg.reason)
                run.job.cancel()
            self.outbox.pop((msg.task_id, msg.attempt), None)
        elif isinstance(msg, P.Ack):
            self.outbox.pop((msg.task_id, msg.attempt), None)
            pipe.mark(msg.task_id, msg.attempt, "acked")
            if not msg.accepted:
                log.warning("task %s/%s not accepted: %s", msg.task_id, msg.attempt, msg.reason)
        elif isinstance(msg, (P.Blob, P.BlobAck)):
            self.transfers.deliver(msg)
        elif isinstance(msg, P.Ticket):
            self.transfers.deliver_ticket(msg)
        elif isinstance(msg, P.Error):
            if (f"unknown command {P.TicketGet.command:02x}" in msg.reason  # an older coordinator: no tickets
                    or msg.reason.startswith("TicketGet is not")):
                self.transfers.no_tickets()
                return
            log.error("coordinator says: %s", msg.reason)
        elif isinstance(msg, P.Price):
            print(self.earnings.price_line(msg), flush=True)
        elif isinstance(msg, P.Earned) and (line := self.earnings.earned_line(msg)):
            print(line, flush=True)

    # ------------------------------------------------------------------ tasks
    def _start_task(self, msg: P.Task) -> None:
        key = (msg.task_id, msg.attempt)
        if key in self.running or key in self.outbox:
            return
        if self.paused:  # sent before our READY 0 arrived: back at once, without fault
            self.send(P.Release(msg.task_id, msg.attempt, self.paused[:500]))
            return
        slot = self.pipeline.place(self.running.values())
        if slot is None:
            self.send(P.Failed(msg.task_id, msg.attempt, "worker has no free slot", True))
            return
        job = asyncio.create_task(self._run_task(msg, slot))
        self.running[key] = Running(msg, slot, job)
        pipe.mark(*key, "leased")

    async def _run_task(self, msg: P.Task, slot: int) -> None:
        key = (msg.task_id, msg.attempt)
        runtime_name = EXECUTORS[msg.kind][0] if msg.kind in EXECUTORS else None
        out_dir = self.task_dir(runtime_name, slot, f"task{msg.task_id}-{msg.attempt}")
        final: Any = None
        for sha in msg.inputs:
            self.cache.pin(sha)
        try:
            final = await self._execute(msg, slot, out_dir)
        except TaskFailure as exc:
            final = P.Failed(msg.task_id, msg.attempt, str(exc), exc.retryable)
        except RuntimeCrashed as exc:
            rt = self.runtimes.get((runtime_name, slot)) if runtime_name else None
            why = rt.limit_reason(exc) if rt is not None else ""
            if why:  # a sandbox limit stopped it: the scene's doing, not the worker's (no reputation lost)
                final = P.Failed(msg.task_id, msg.attempt, f"the task was stopped: {why}", False)
            else:
                final = P.Failed(msg.task_id, msg.attempt, f"the runtime crashed: {exc}", True)
        except Exception as exc:  # keep the daemon up whatever happens in one task
            log.exception("task %s failed", key)
            final = P.Failed(msg.task_id, msg.attempt, f"worker error: {exc!r}", True)
        finally:
            run = self.running.get(key)
            for sha in [*msg.inputs, *(run.pins if run else [])]:
                self.cache.unpin(sha)
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.rmtree(self._taken_dir(out_dir), ignore_errors=True)
            self.running.pop(key, None)
            if final is not None:
                self.outbox[key] = final
                self.send(final)
                pipe.mark(*key, "reported")
            self.stats["tasks"] += 1
            self.send(P.Ready(self.free_slots()))

    async def _execute(self, msg: P.Task, slot: int, out_dir: Path) -> P.Result:
        if msg.kind not in EXECUTORS:
            raise TaskFailure(f"this worker cannot run {msg.kind!r} tasks", True)
        runtime_name, executor = EXECUTORS[msg.kind]
        files = await self._fetch_all(msg.inputs)  # meanwhile the slot may still render
        try:
            more = project_files.named_blobs(msg.spec, files)  # a project's: named by its manifest
        except project_files.LayoutError as exc:
            raise TaskFailure(str(exc), False) from None
        for sha in more:
            self.cache.pin(sha)  # unpinned with the inputs (_run_task)
            self.running[(msg.task_id, msg.attempt)].pins.append(sha)
        files.update(await self._fetch_all(more))
        pipe.mark(msg.task_id, msg.attempt, "fetched")
        async with self.pipeline.turn(self.running[(msg.task_id, msg.attempt)], lambda: self._kill_slot(slot)):
            pipe.mark(msg.task_id, msg.attempt, "turn")
            produced = await self._render(msg, slot, out_dir, runtime_name, executor, files)
            rt = self.runtimes.get((runtime_name, slot))
            pipe.mark(msg.task_id, msg.attempt, "rendered", frames=rt.marks if rt else [])
            await self._recycle_if_bloated(slot, runtime_name)
            produced = pipe.take_outputs(produced, out_dir, self._taken_dir(out_dir))  # out of the child's reach
        await asyncio.sleep(0)  # the turn passed: the next task's request reaches the child before this hashing
        result, seconds = [], 0.0  # the next task renders in the slot while these upload
        for p in produced:
            sha = await asyncio.to_thread(file_sha256, p.path)
            await self.upload(p.path, sha)
            result.append({"frame": p.frame, "sha256": sha, "size": p.path.stat().st_size, "name": p.name,
                           "seconds": p.seconds})
            seconds += p.seconds
        pipe.mark(msg.task_id, msg.attempt, "uploaded")
        return P.Result(msg.task_id, msg.attempt, result, seconds)

    async def _fetch_all(self, shas) -> dict[str, Path]:
        """The cached paths of blobs ``shas`` (in their order), up to FETCH_PARALLEL fetched at once; the
        first failure stops the others and is raised."""
        gate = asyncio.Semaphore(C.FETCH_PARALLEL)

        async def one(sha: str) -> tuple[str, Path]:
            async with gate:
                return sha, await self.fetch(sha)
        jobs = [asyncio.ensure_future(one(sha)) for sha in dict.fromkeys(shas)]
        try:
            return dict(await asyncio.gather(*jobs))
        except BaseException:
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise

    def _taken_dir(self, out_dir: Path) -> Path:
        """Where a finished task's outputs wait for upload: the daemon's own folder, not the child's."""
        return self.dir / "work" / out_dir.name if self.sandboxed else out_dir

    async def _kill_slot(self, slot: int) -> None:
        for (_name, sl), rt in list(self.runtimes.items()):
            if sl == slot:
                await rt.kill()  # the work in progress is abandoned; a fresh child starts next time

    async def _render(self, msg: P.Task, slot: int, out_dir: Path, runtime_name: str | None, executor,
                      files: dict[str, Path]) -> list:
        """The slot's turn: stage the inputs for its child, run the executor; the files it produced."""
        inputs = self.stage(runtime_name, slot, files)
        total = int(msg.spec.get("units", 0)) or len(msg.spec.get("outputs", [])) or 1
        self.send(P.Progress(msg.task_id, msg.attempt, 0, total, "inputs ready"))
        out_dir.mkdir(parents=True, exist_ok=True)
        if runtime_name and (policy := self.policy(runtime_name, slot)) is not None:
            sandboxing.give(policy, out_dir)

        def progress(done: int, of: int, message: str) -> None:
            if run := self.running.get((msg.task_id, msg.attempt)):
                run.done, run.total = done, of
            self.send(P.Progress(msg.task_id, msg.attempt, done, of, message))

        async def runtime() -> RuntimeProcess:
            return await self._runtime(slot, runtime_name)
        ctx = TaskContext(msg.task_id, msg.attempt, msg.kind, msg.spec, inputs, out_dir, progress, runtime,
                          models={m.hash: m.path for m in self.models if m.ok})
        return await (self._limited(ctx, runtime_name, slot, executor) if runtime_name else executor(ctx))

    async def _limited(self, ctx: TaskContext, runtime_name: str, slot: int, executor) -> list:
        """Run ``executor`` under the task's wall-clock and CPU-time limits (from its job, else TASK_SECONDS
        a frame): the slot's runtime child is stopped when it passes one, and the task fails for good."""
        settings = ctx.spec.get("settings") if isinstance(ctx.spec.get("settings"), dict) else {}
        per = settings.get("time_limit") or ctx.spec.get("time_limit") or C.TASK_SECONDS
        per = float(per) if type(per) in (int, float) and 0 < per <= 30 * 86400 else C.TASK_SECONDS
        units = max(1, len(ctx.spec.get("frames") or ctx.spec.get("images") or [1]))
        wall = per * units
        cpu = wall * max(1, C.RENDER_THREADS or os.cpu_count() or 1)
        rt = await self._runtime(slot, runtime_name)
        watch = asyncio.create_task(rt.watch(wall, cpu))
        try:
            return await executor(ctx)
        finally:
            watch.cancel()  # not awaited: it ends at its next sleep, and the next task waits for this turn

    async def _recycle_if_bloated(self, slot: int, name: str | None) -> None:
        """Restart the slot's ``name`` child, which just ran a task, if it grew past RUNTIME_MAX_RSS_BYTES (it
        is started again lazily). Its size is the one it reported with the task's "done" (its own VmRSS: no
        /proc walk of the sandbox's process tree while the next task waits for the turn), else /proc's.
        The slot's other children were idle and were checked after their own last task."""
        rt = self.runtimes.get((name, slot)) if name else None
        if rt is None or not rt.alive:
            return
        rss = rt.reported_rss if rt.reported_rss is not None else rt.usage()[2]
        if rss > C.RUNTIME_MAX_RSS_BYTES:
            log.warning("%s runtime of slot %d uses %d MB, over the ceiling: restarting it", name, slot, rss >> 20)
            await rt.stop()

    # ------------------------------------------------------------------ blob transfer (worker.transfer)
    async def fetch(self, sha: str) -> Path:
        """The cached path of blob ``sha``, downloading what is missing (resumes a partial download)."""
        return await self.transfers.fetch(sha)

    async def upload(self, path: Path, sha: str) -> None:
        """Send ``path`` as blob ``sha`` (resumes from the bytes the coordinator stored)."""
        await self.transfers.upload(path, sha)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self) -> None:
        for run in list(self.running.values()):
            run.job.cancel()
        await asyncio.gather(*(r.job for r in list(self.running.values())), return_exceptions=True)
        await asyncio.gather(*(rt.stop() for rt in self.runtimes.values()), return_exceptions=True)

    def stop(self) -> None:
        self.stopping.set()


def main(coordinator: str, cache_dir: Path, slots: int, wallet: str, gpus: str, worker_id: str | None,
         models: list[str] | None = None, benchmark: str = "auto", server_key: bytes | None = None,
         enroll_token: str = "", sandbox: bool = True, memory_bytes: int | None = None,
         availability: avail.Availability | None = None, vram_limit: int | None = None) -> None:
    import signal

    from common.logs import setup
    setup()

    async def _main() -> None:
        daemon = WorkerDaemon(coordinator, cache_dir, slots, wallet, gpus, worker_id,
                              models=model_folders.configured_dirs(models) if models else None,
                              benchmark=benchmark, server_key=server_key, enroll_token=enroll_token,
                              sandbox=sandbox, limits=sandboxing.Limits(
                                  **({"memory_bytes": memory_bytes} if memory_bytes else {})),
                              availability=availability,
                              **({"vram_limit": vram_limit} if vram_limit else {}))
        if server_key:
            print(f"worker {daemon.id}: key {daemon.keypair[0].decode()}; pins the coordinator key "
                  f"{server_key.decode()}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.run()

    asyncio.run(_main())

