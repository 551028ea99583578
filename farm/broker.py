"""The coordinator's ZeroMQ front: a ROUTER socket under asyncio feeding :class:`Coordinator.step`.

The event loop only moves bytes: it drains whatever messages are waiting (up to BATCH_MAX_MESSAGES),
hands the batch to the coordinator in a single dedicated thread (database work and fsync never block the
loop, which also serves HTTP), then sends the replies the coordinator returned after its commit.
Heartbeats go to every connected worker each HEARTBEAT_INTERVAL.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from farm import constants as C
from farm import protocol as P
from farm.coordinator import Coordinator

log = logging.getLogger("farm.broker")


class Broker:
    def __init__(self, coordinator: Coordinator, bind: str, ctx: zmq.asyncio.Context | None = None):
        self.coord = coordinator
        self.bind = bind
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.endpoint = ""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="coordinator")

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
        for ident, msg in out:
            try:
                await self.sock.send_multipart([ident, *P.encode(msg)], flags=zmq.NOBLOCK)
            except zmq.Again:  # peer's queue full or peer gone: heartbeats/sweeps recover
                log.debug("dropped %s to %s", type(msg).__name__, ident.hex())

    async def run(self) -> None:
        sock = self.sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.MAXMSGSIZE, C.MAX_MESSAGE_BYTES + 1024)
        if self.bind.endswith(":0"):
            port = sock.bind_to_random_port(self.bind[:-2])
            self.endpoint = f"{self.bind[:-2]}:{port}"
        else:
            sock.bind(self.bind)
            self.endpoint = self.bind
        self._ready.set()
        log.info("worker plane listening on %s", self.endpoint)
        loop = asyncio.get_running_loop()
        next_hb = time.monotonic()
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(next_hb - time.monotonic(), C.SWEEP_INTERVAL))
                if not await sock.poll(0):
                    poll = asyncio.ensure_future(sock.poll(int(timeout * 1000) + 1))
                    wake = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({poll, wake}, return_when=asyncio.FIRST_COMPLETED)
                    for f in (poll, wake):
                        f.cancel()
                    self._wake.clear()
                batch = []
                while len(batch) < C.BATCH_MAX_MESSAGES:
                    try:
                        batch.append(await sock.recv_multipart(flags=zmq.NOBLOCK, copy=True))
                    except zmq.Again:
                        break
                out = await loop.run_in_executor(self._pool, self.coord.step, batch)
                if time.monotonic() >= next_hb:
                    next_hb = time.monotonic() + C.HEARTBEAT_INTERVAL
                    out += self.coord.heartbeats()
                await self._send(out)
        finally:
            sock.close(0)
            self._pool.shutdown(wait=True)
