"""The sealed blob server: sealed files (:mod:`farm.store.sealed`) to workers over plain HTTP, by ``sendfile``.

One request a connection: ``GET /sealed/<ticket> HTTP/1.1`` with an optional ``Range: bytes=START-``
(``START`` a record boundary, :func:`common.sealed.record_offset`), answered ``200``/``206`` with the sealed
bytes from there to the end, then the connection closes. The bytes are ciphertext whose key only ticket
holders were given (over CurveZMQ), so the server needs no TLS: the kernel copies file pages to the socket
and the coordinator spends no CPU per byte (bench/fanout.py).

Everyone may connect, so everything is bounded before a file is opened: at most MAX_CONNECTIONS at once
(past that: ``503`` and close), a request head of at most HEAD_BYTES read within HEAD_SECONDS (else the
connection closes: slow heads hold nothing long), a ticket must be live (``403`` otherwise: "ask the
coordinator for a new one", which a worker does itself) and may have TICKET_STREAMS downloads open, and a
download that makes no progress for STALL_SECONDS (a reader that stopped reading) is closed. A blob still
being sealed is sent as its records are written.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from common import sealed as S
from farm.store.sealed import TICKET_STREAMS, SealedChannel

log = logging.getLogger("farm.plane.sealed_http")

MAX_CONNECTIONS = 256
HEAD_BYTES = 4096
HEAD_SECONDS = 10.0
STALL_SECONDS = 30.0
SEGMENT = 16 * 1024 * 1024
"""Bytes a ``sendfile`` call is given at once (each within STALL_SECONDS)."""

_REQUEST = re.compile(rb"GET /sealed/([A-Za-z0-9_-]{16,64}) HTTP/1\.[01]\r\n")
_RANGE = re.compile(rb"\r\nrange:[ \t]*bytes=(\d{1,15})-[ \t]*\r\n", re.IGNORECASE)

_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            416: "Range Not Satisfiable", 503: "Service Unavailable"}


class SealedServer:
    """Serves ``channel``'s sealed files on ``host:port`` (0: any free port; :attr:`port` after start)."""

    def __init__(self, channel: SealedChannel, host: str, port: int):
        self.channel = channel
        self.host = host
        self.port = port
        self.open = 0
        self.server: asyncio.base_events.Server | None = None
        self.stats = channel.stats

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, self.host, self.port, limit=HEAD_BYTES,
                                                 backlog=128)
        self.port = self.server.sockets[0].getsockname()[1]
        self.channel.port = self.port
        log.info("sealed blob server on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        self.channel.port = 0
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            if self.open > MAX_CONNECTIONS:
                await self._refuse(writer, 503, "too many downloads at once: try again in a few seconds")
                return
            try:
                async with asyncio.timeout(HEAD_SECONDS):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # a slow, cut or oversized head: nothing was opened for it
            await self._serve(head, writer)
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, why: str) -> None:
        body = (why + "\n").encode()
        writer.write(self._head(status, len(body)) + body)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await writer.drain()

    @staticmethod
    def _head(status: int, length: int, extra: str = "") -> bytes:
        return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Length: {length}\r\n{extra}"
                "Connection: close\r\n\r\n").encode()

    async def _serve(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        m = _REQUEST.match(head)
        if m is None:
            await self._refuse(writer, 400, "only GET /sealed/<ticket> is served here (a worker's sealed downloads)")
            return
        ticket = self.channel.ticket(m.group(1).decode())
        if ticket is None:
            await self._refuse(writer, 403, "unknown or expired ticket: ask the coordinator for a new one "
                                            "(TICKET_GET)")
            return
        if ticket.streams >= TICKET_STREAMS:
            await self._refuse(writer, 503, f"this ticket has {ticket.streams} downloads open already")
            return
        total = S.sealed_size(ticket.size)
        r = _RANGE.search(head)
        start = int(r.group(1)) if r else 0
        if start % (S.RECORD + S.TAG) or start > total:
            await self._refuse(writer, 416, f"a range starts at a record ({S.RECORD + S.TAG} bytes each) "
                                            f"within the {total} sealed bytes")
            return
        ticket.streams += 1
        sealing = self.channel.acquire(ticket.sha, ticket.size)
        try:
            f = sealing.open()
        except OSError:
            self.channel.release(sealing)
            ticket.streams -= 1
            await self._refuse(writer, 404, "the blob is gone from the coordinator: fetch it as BLOB chunks")
            return
        self.stats["streams"] += 1
        try:
            status = 206 if r else 200
            extra = f"Content-Range: bytes {start}-{total - 1}/{total}\r\n" if r and total else ""
            writer.write(self._head(status, total - start, extra))
            await self._send(writer, f, sealing, start, total)
        finally:
            f.close()
            self.channel.release(sealing)
            ticket.streams -= 1

    async def _send(self, writer: asyncio.StreamWriter, f, sealing, pos: int, total: int) -> None:
        loop = asyncio.get_running_loop()
        while pos < total:
            ready = sealing.ready()
            if sealing.error:
                return  # cut short: the worker's length check sees it and fetches the rest as BLOB chunks
            if ready <= pos:
                await asyncio.sleep(0.005)  # the sealer is behind this reader (the first moments of a blob)
                continue
            n = min(ready - pos, SEGMENT)
            async with asyncio.timeout(STALL_SECONDS):
                sent = await loop.sendfile(writer.transport, f, pos, n)
            if not sent:
                return
            pos += sent
            self.stats["bytes_sent"] += sent
        async with asyncio.timeout(STALL_SECONDS):
            await writer.drain()
