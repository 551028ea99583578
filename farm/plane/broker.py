"""The coordinator's ZeroMQ front: a ROUTER socket under asyncio feeding :class:`Coordinator.step`.

The event loop only moves bytes: it drains whatever messages are waiting (up to BATCH_MAX_MESSAGES),
hands the batch to the coordinator in a single dedicated thread (database work and fsync never block the
loop, which also serves HTTP), then sends the replies the coordinator returned after its commit.
Heartbeats go to every connected worker each HEARTBEAT_INTERVAL. Once the step's statements have run (on
PostgreSQL: once they and the COMMIT are sent, farm.store.writes) and its commit starts, it tells the loop
(``Coordinator.on_commit``), which drains the messages that arrived
meanwhile into the next batch while the commit writes and fsyncs without the GIL: that receiving costs no
time of the step's thread.

With a :class:`farm.plane.gate.Keyring` (``farm serve`` always has one) the socket is a CURVE server: pyzmq's
ZAP authenticator decides each handshake, and every received message passes the :class:`farm.plane.gate.Gate`
(which reads the connection's key off the routing-id frame) before it joins a batch. Without one (the
in-process tests and benchmarks) the socket speaks plain ZMTP.

What waits for a peer that reads nothing is bounded twice: PEER_SEND_QUEUE messages (ZeroMQ's SNDHWM,
ROUTER_MANDATORY) and PEER_SEND_BYTES of BLOB chunks (their zero-copy bodies are tracked until libzmq lets
go of them): past either the peer is ``congested``, served nothing, and dropped after the liveness time.
"""
from __future__ import annotations

import asyncio
import collections
import gc
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio
import zmq.backend

from common import limits as L
from common import protocol as P
from farm import constants as C
from farm.core.coordinator import Coordinator
from farm.plane import gate as curve

log = logging.getLogger("farm.plane.broker")


# pyzmq's Cython socket methods, called with int flags: its Python wrappers (send_multipart, recv_multipart)
# cost more than the sends and receives themselves (~3 µs a message), much of it enum flag arithmetic
# (and a getsockopt(RCVMORE) builds an enum: a Frame's .more is read instead)
_SEND, _RECV = zmq.backend.Socket.send, zmq.backend.Socket.recv
_NB, _MORE_NB = int(zmq.NOBLOCK), int(zmq.SNDMORE | zmq.NOBLOCK)
_BLOB_COMMAND = P.encode(P.Blob("", 0, 0, b""))[1]

SHARED_BODY_BYTES = 64 * 1024
"""A BLOB reply whose chunk is at least this big is encoded once for every peer that asks for the same
chunk (the blob store hands them the same ``bytes``) and sent without a copy (pyzmq ``copy=False``)."""

SHARED_BODIES = 32
"""Encoded BLOB bodies kept for the next peer asking for the same chunk (≤ 32 × a 1 MiB chunk)."""

GC_GEN0_THRESHOLD = 10_000
"""Allocations between young-generation collections in a coordinator process (Python's default: 700)."""


def tune_gc() -> None:
    """Tune the cyclic garbage collector for a coordinator process; call once, when start-up is done.

    The process holds a large heap that lives as long as it does (ORM mappers, compiled statements, the
    web app, the lease book), and the step allocates small objects by the thousand. With the defaults the
    collector walks young objects every 700 allocations and the whole heap every hundred of those: about a
    tenth of the step's CPU at 50 workers (bench/dispatch.py). What exists at start-up is frozen (never
    walked again) and young collections run every GC_GEN0_THRESHOLD allocations. Cycles are still
    collected; only less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


class Broker:
    def __init__(self, coordinator: Coordinator, bind: str, ctx: zmq.asyncio.Context | None = None,
                 keyring: curve.Keyring | None = None):
        self.coord = coordinator
        self.keyring = keyring
        self.gate = curve.Gate(keyring) if keyring else None
        self.bind = bind
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.endpoint = ""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="coordinator")
        self._early: list[list[bytes]] = []  # the next batch, drained while a step commits
        self._loop: asyncio.AbstractEventLoop | None = None
        # (sha256, offset, total) → (the chunk's bytes, its encoded body): the fan-out of one scene
        self._bodies: OrderedDict[tuple, tuple[bytes, bytes]] = OrderedDict()
        # routing id → (tracker, bytes) of the BLOB chunks libzmq still holds for it (PEER_SEND_BYTES)
        self._tracked: dict[bytes, collections.deque] = {}
        self._queued_bytes: dict[bytes, int] = {}

    def wake(self) -> None:
        """Ask for an assignment round soon (new job submitted, lease revoked). Call from the loop."""
        self.coord.want_assign = True
        self._wake.set()

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the coordinator's thread, serialized with ``step``, then wake the loop."""
        result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self.wake()
        return result

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def ready(self) -> str:
        await self._ready.wait()
        return self.endpoint

    async def _send(self, out) -> None:
        raw, send = self._raw, _SEND
        congested, clock = self.coord.congested, self.coord.clock
        for ident, msg in out:
            if type(msg) is P.Blob and len(msg.data) >= SHARED_BODY_BYTES:
                if self.queued_bytes(ident) + len(msg.data) > C.PEER_SEND_BYTES:  # as if its queue were full
                    congested.setdefault(ident, clock())
                    continue
                header, command, body = self._blob_frames(msg)
                copy = False  # libzmq holds a reference to the shared body until its I/O thread sent it
            else:
                header, command, body = P.encode(msg)
                copy = True
            try:  # ROUTER refuses (or drops) a message at its first frame only
                send(raw, ident, _MORE_NB)
                send(raw, header, _MORE_NB)
                send(raw, command, _MORE_NB)
                if copy:
                    send(raw, body, _NB)
                else:  # tracked: done once libzmq let go of the body (taken off the peer's queue)
                    self._queue(ident).append((send(raw, body, _NB, False, True), len(msg.data)))
                    self._queued_bytes[ident] += len(msg.data)
            except zmq.Again:  # the peer's queue is full: it reads nothing (the coordinator decides what next)
                congested.setdefault(ident, clock())
                log.debug("dropped %s to %s: its send queue is full", type(msg).__name__, ident.hex())
                continue
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; heartbeats and sweeps recover
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                continue
            # a message went out: its queue is not full, unless its chunks' bytes still are
            if congested and ident in congested and self.queued_bytes(ident) + L.BLOB_CHUNK_SIZE <= C.PEER_SEND_BYTES:
                del congested[ident]

    def _queue(self, ident: bytes) -> collections.deque:
        q = self._tracked.get(ident)
        if q is None:
            q = self._tracked[ident] = collections.deque()
            self._queued_bytes[ident] = 0
        return q

    def queued_bytes(self, ident: bytes) -> int:
        """Bytes of BLOB chunks sent to ``ident`` that libzmq still holds (its queue, the one being written):
        PEER_SEND_BYTES bounds them. Their trackers end in about the order they were queued."""
        q = self._tracked.get(ident)
        if not q:
            return 0
        while q and q[0][0].done:
            self._queued_bytes[ident] -= q.popleft()[1]
        if not q:
            del self._tracked[ident], self._queued_bytes[ident]
            return 0
        return self._queued_bytes[ident]

    def _prune_tracked(self) -> None:
        """Forget peers whose chunks all went (or were dropped with their connection): bounded by peers."""
        for ident in list(self._tracked):
            self.queued_bytes(ident)

    def _blob_frames(self, msg: P.Blob) -> list[bytes]:
        """The frames of BLOB chunk ``msg``, its body encoded once for all the peers sent the same chunk
        object (the same bytes: :class:`farm.store.blobs.ChunkCache`) while it is among SHARED_BODIES."""
        key = (msg.sha256, msg.offset, msg.total)
        bodies = self._bodies
        hit = bodies.get(key)
        if hit is not None and hit[0] is msg.data:
            bodies.move_to_end(key)
            return [P.PROTOCOL_HEADER, _BLOB_COMMAND, hit[1]]
        frames = P.encode(msg)
        bodies[key] = (msg.data, frames[2])
        if len(bodies) > SHARED_BODIES:
            bodies.popitem(last=False)
        return frames

    def _recv(self) -> list[bytes] | None:
        """The next waiting message (raises zmq.Again when none is), or None when the gate refused it."""
        raw = self._raw
        first = frame = _RECV(raw, _NB, False)  # Frames: .more without a getsockopt, and the routing id's metadata
        frames = [first.bytes]
        while frame.more:
            frame = _RECV(raw, _NB, False)
            frames.append(frame.bytes)
        if self.gate is None:
            return frames
        try:
            key = first.get("User-Id")
        except zmq.ZMQError:
            key = None
        return frames if self.gate.admit(frames, key) else None

    def _drain(self, batch: list[list[bytes]]) -> None:
        """Append the waiting messages to ``batch`` (up to BATCH_MAX_MESSAGES in it). Loop thread only."""
        while len(batch) < C.BATCH_MAX_MESSAGES:
            try:
                frames = self._recv()
            except zmq.Again:
                return
            if frames is not None:
                batch.append(frames)

    def _drain_early(self) -> None:
        if self.sock is not None and not self.sock.closed:
            self._drain(self._early)

    def _on_commit(self) -> None:
        """Coordinator thread, as its step starts to commit: the loop drains the next batch meanwhile."""
        try:
            self._loop.call_soon_threadsafe(self._drain_early)
        except RuntimeError:  # the loop is closing: the messages wait for the next start
            pass

    async def revoke(self, key: str, reason: str) -> dict:
        """Revoke ``key`` (farm.plane.gate): refused from now on; its connections dropped and leases requeued."""
        ids = set(self.keyring.unbind(key))
        self.keyring.revoke(key)
        return await self.call(curve.expel, self.coord, self.gate, {key}, ids, reason)

    async def _reload_keys(self) -> None:
        """Expel the keys an edit of the allow-list or the revocations took away."""
        gone = self.keyring.refresh()
        if gone:
            ids = {w for w, k in self.keyring.bindings.items() if k in gone}
            for key in gone & self.keyring.revoked:
                self.keyring.unbind(key)
            await asyncio.get_running_loop().run_in_executor(
                self._pool, curve.expel, self.coord, self.gate, gone, ids, "this worker's key is no longer admitted")
            self.wake()  # the DISCONNECTs leave with the next step, now

    async def run(self) -> None:
        auth = None
        if self.keyring:  # the ZAP handler first: a handshake before it exists would not be checked
            auth = curve.ZapHandler(self.ctx, self.keyring)
            auth.start()
        sock = self.sock = self.ctx.socket(zmq.ROUTER)
        # The loop waits on the asyncio socket; non-blocking sends and receives go through a plain socket on
        # the same libzmq socket, which skips a future per message (same thread, so it is safe).
        self._raw = zmq.Socket.shadow(sock.underlying)
        if self.keyring:
            curve.secure_server(sock, self.keyring)
        sock.setsockopt(zmq.LINGER, 0)
        # a full peer queue raises (EAGAIN) instead of dropping silently: the coordinator marks the peer
        # congested, serves it nothing more, and drops it after the liveness time (farm.core.coordinator)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, C.PEER_SEND_QUEUE)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.MAXMSGSIZE, L.MAX_MESSAGE_BYTES + 1024)
        if self.bind.endswith(":0"):
            port = sock.bind_to_random_port(self.bind[:-2])
            self.endpoint = f"{self.bind[:-2]}:{port}"
        else:
            sock.bind(self.bind)
            self.endpoint = self.bind
        self._ready.set()
        log.info("worker plane listening on %s", self.endpoint)
        loop = self._loop = asyncio.get_running_loop()
        self.coord.on_commit = self._on_commit
        next_hb = last_step = time.monotonic()
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(next_hb - time.monotonic(), C.SWEEP_INTERVAL))
                batch, self._early = self._early, []  # drained while the last step committed
                if not batch and not await sock.poll(0):
                    poll = asyncio.ensure_future(sock.poll(int(timeout * 1000) + 1))
                    wake = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({poll, wake}, return_when=asyncio.FIRST_COMPLETED)
                    finally:  # also when cancelled: a poll left pending on a socket closed below never ends
                        for f in (poll, wake):
                            f.cancel()
                    self._wake.clear()
                self._drain(batch)
                # granted BLOB_GETs of cached chunks leave now, without a step (its session and commit cost
                # ~1 ms, as much as serving 8 chunks); a step still runs at least every SWEEP_INTERVAL / 2
                cached: list = []
                batch = self.coord.blob_requests.serve_cached(self.coord.conns, batch, self.coord.clock(), cached)
                if cached:
                    await self._send(cached)  # before the step's replies: the order each connection asked in
                if batch or not cached or self.coord.want_assign or time.monotonic() - last_step >= C.SWEEP_INTERVAL / 2:
                    last_step = time.monotonic()
                    out = await loop.run_in_executor(self._pool, self.coord.step, batch)
                else:
                    out = []
                    self.coord.stats["steps_skipped"] += 1
                if self.gate is not None and self.gate.out:
                    out, self.gate.out = self.gate.out + out, []
                if time.monotonic() >= next_hb:
                    next_hb = time.monotonic() + L.HEARTBEAT_INTERVAL
                    out += self.coord.heartbeats()
                    self._prune_tracked()
                    if self.gate is not None:
                        self.gate.prune(self.coord.conns)
                        await self._reload_keys()
                await self._send(out)
        finally:
            self.coord.on_commit = None
            sock.close(0)
            if auth is not None:
                auth.stop()
            self._pool.shutdown(wait=True)
