"""The sealed blob server: sealed files (:mod:`farm.store.sealed`) to workers over plain HTTP, by ``sendfile``.

One request a connection: ``GET /sealed/<ticket> HTTP/1.1`` with an optional ``Range: bytes=START-``
(``START`` a record boundary, :func:`common.sealed.record_offset`), answered ``200``/``206`` with the sealed
bytes from there to the end, then the connection closes. The bytes are ciphertext whose key only ticket
holders were given (over CurveZMQ), so the server needs no TLS: the kernel copies file pages to the socket.

The event loop accepts and reads request heads; a body is sent by a blocking ``sendfile`` in one of
MAX_STREAMS threads, which the kernel refills as the socket drains: on a loaded host a loop thread woken
for every socket buffer's worth starved all the downloads behind it (bench/fanout.py: the coordinator's
CPU a GiB near the plain HTTP server's only this way).

Everyone may connect, so everything is bounded before a file is opened: at most MAX_CONNECTIONS at once
(past that: ``503`` and close), a request head of at most HEAD_BYTES read within HEAD_SECONDS (else the
connection closes: slow heads hold nothing long), a ticket must be live (``403`` otherwise: "ask the
coordinator for a new one", which a worker does itself), TICKET_STREAMS downloads a ticket and
STREAMS_PER_CONNECTION a worker connection at once, and a download that makes no progress for
STALL_SECONDS (a reader that stopped reading; the kernel's send timeout) is closed. A blob still being
sealed is sent as its records are written.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from common import sealed as S
from farm.store.sealed import TICKET_STREAMS, SealedChannel, Sealing, Ticket

log = logging.getLogger("farm.plane.sealed_http")

MAX_CONNECTIONS = 256
MAX_STREAMS = 64
"""Bodies being sent at once (threads); further downloads wait for one, their connections counted."""
STREAMS_PER_CONNECTION = 4
HEAD_BYTES = 4096
HEAD_SECONDS = 10.0
STALL_SECONDS = 30.0
SEGMENT = 64 * 1024 * 1024
"""Bytes one ``sendfile`` call is given."""

_REQUEST = re.compile(rb"GET /sealed/([A-Za-z0-9_-]{16,64}) HTTP/1\.[01]\r\n")
_RANGE = re.compile(rb"\r\nrange:[ \t]*bytes=(\d{1,15})-[ \t]*\r\n", re.IGNORECASE)

_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            416: "Range Not Satisfiable", 503: "Service Unavailable"}


def _head(status: int, length: int, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Length: {length}\r\n{extra}"
            "Connection: close\r\n\r\n").encode()


class _Refused(Exception):
    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class SealedServer:
    """Serves ``channel``'s sealed files on ``host:port`` (0: any free port; :attr:`port` after start)."""

    def __init__(self, channel: SealedChannel, host: str, port: int):
        self.channel = channel
        self.host = host
        self.port = port
        self.open = 0  # connections, from accept to close
        self.stats = channel.stats
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix="sealed-send")
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._by_conn: dict[bytes, int] = {}  # worker connection → its downloads open

    async def start(self) -> int:
        family = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        self._sock = socket.create_server((self.host, self.port), family=family, backlog=128)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self.channel.port = self.port
        self._accepting = asyncio.create_task(self._accept())
        log.info("sealed blob server on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        self.channel.port = 0
        self._stopping.set()
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        for conn in list(self._conns):  # a blocked sendfile returns at once
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._sock is not None:
            self._sock.close()
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors: wait rather than spin
                log.warning("sealed server accept: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self.open += 1
            self._conns.add(conn)
            asyncio.create_task(self._handle(conn))

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.open > MAX_CONNECTIONS:
                raise _Refused(503, "too many downloads at once: try again in a few seconds")
            head = await self._read_head(loop, conn)
            if head is None:
                return  # a slow, cut or oversized head: nothing was opened for it
            await self._serve(loop, conn, *self._check(head))
        except _Refused as r:
            body = (str(r) + "\n").encode()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await loop.sock_sendall(conn, _head(r.status, len(body)) + body)
                conn.recv(HEAD_BYTES)  # an unread request makes close() a reset, which can beat the answer
        except (OSError, TimeoutError):
            pass
        finally:
            self._conns.discard(conn)
            conn.close()
            self.open -= 1

    @staticmethod
    async def _read_head(loop, conn: socket.socket) -> bytes | None:
        buf = b""
        try:
            async with asyncio.timeout(HEAD_SECONDS):
                while b"\r\n\r\n" not in buf:
                    if len(buf) >= HEAD_BYTES:
                        return None
                    data = await loop.sock_recv(conn, HEAD_BYTES - len(buf))
                    if not data:
                        return None
                    buf += data
        except (TimeoutError, OSError):
            return None
        return buf

    def _check(self, head: bytes) -> tuple[Ticket, int, bool]:
        """The live ticket a request head presents, where its range starts and whether it asked for one."""
        m = _REQUEST.match(head)
        if m is None:
            raise _Refused(400, "only GET /sealed/<ticket> is served here (a worker's sealed downloads)")
        ticket = self.channel.ticket(m.group(1).decode())
        if ticket is None:
            raise _Refused(403, "unknown or expired ticket: ask the coordinator for a new one (TICKET_GET)")
        if ticket.streams >= TICKET_STREAMS:
            raise _Refused(503, f"this ticket has {ticket.streams} downloads open already")
        if self._by_conn.get(ticket.identity, 0) >= STREAMS_PER_CONNECTION:
            raise _Refused(503, f"this worker has {STREAMS_PER_CONNECTION} downloads open already")
        total = S.sealed_size(ticket.size)
        r = _RANGE.search(head)
        start = int(r.group(1)) if r else 0
        if start % (S.RECORD + S.TAG) or start > total:
            raise _Refused(416, f"a range starts at a record ({S.RECORD + S.TAG} bytes each) within the "
                                f"{total} sealed bytes")
        return ticket, start, r is not None

    async def _serve(self, loop, conn: socket.socket, ticket: Ticket, start: int, ranged: bool) -> None:
        ticket.streams += 1
        self._by_conn[ticket.identity] = self._by_conn.get(ticket.identity, 0) + 1
        sealing = self.channel.acquire(ticket.sha, ticket.size)
        try:
            try:
                f = sealing.open()
            except OSError:
                raise _Refused(404, "the blob is gone from the coordinator: fetch it as BLOB chunks") from None
            with f:
                total = sealing.sealed_size
                extra = f"Content-Range: bytes {start}-{total - 1}/{total}\r\n" if ranged and total else ""
                self.stats["streams"] += 1
                sent = await loop.run_in_executor(
                    self._pool, self._send, conn, f, sealing, _head(206 if ranged else 200, total - start, extra),
                    start, total)
                self.stats["bytes_sent"] += sent  # after the await: concurrent downloads add their own
        finally:
            ticket.streams -= 1
            left = self._by_conn[ticket.identity] - 1
            if left:
                self._by_conn[ticket.identity] = left
            else:
                del self._by_conn[ticket.identity]

    def _send(self, conn: socket.socket, f, sealing: Sealing, head: bytes, pos: int, total: int) -> int:
        """Sending thread: the head, then the sealed bytes from ``pos`` by blocking sendfile; a send that
        moves nothing for STALL_SECONDS ends it (SO_SNDTIMEO). Returns the bytes of the body sent."""
        first = pos
        conn.setblocking(True)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(STALL_SECONDS), int(STALL_SECONDS % 1 * 1e6)))
        try:
            conn.sendall(head)
            fd, out = f.fileno(), conn.fileno()
            while pos < total and not self._stopping.is_set():
                ready = sealing.done
                if sealing.error:
                    break  # cut short: the worker's length check sees it and fetches the rest as BLOB chunks
                if ready <= pos:  # the sealer is behind this reader: woken by its next record
                    sealing.wait(pos, 0.5)
                    continue
                sent = os.sendfile(out, fd, pos, min(ready - pos, SEGMENT))
                if not sent:
                    break
                pos += sent
        except OSError:  # EAGAIN after SO_SNDTIMEO (a stalled reader), EPIPE, a reset: the download ends
            pass
        return pos - first
