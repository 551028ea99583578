"""The worker's half of the sealed blob channel (format: :mod:`common.sealed`): a big input by HTTP.

:func:`download` runs in a thread (blocking socket, no event loop per byte): one ``GET /sealed/<ticket>``
to the coordinator's sealed server, ``Range`` from the record that holds the first byte still missing;
records are received into one buffer (RECV_RECORDS of them), each opened (AES-256-GCM, the key from
TICKET over CurveZMQ) into another, then written to the partial file and fed to the download's hash — so
only bytes that opened under the blob's key reach the file. It returns how far it got and why it stopped;
the caller (``worker.transfer``) fetches what is left as BLOB chunks, and checks the finished file against
the BLAKE3 digest TICKET carried (or its sha256). What a hostile or broken server can make it do is
bounded: a response head of at most HEAD_BYTES, a length that must be the sealed size from the range's
start, READ_SECONDS without a byte ends it, and a record that does not open ends it.
"""
from __future__ import annotations

import re
import socket
import struct
import threading
from dataclasses import dataclass

from common import sealed as S

HEAD_BYTES = 4096
CONNECT_SECONDS = 10.0
READ_SECONDS = 30.0
RECV_RECORDS = 4
"""Sealed records the receive buffer holds: each receive takes what the socket has, up to that, and the
whole records in it are opened. Against one exact-record receive (``MSG_WAITALL``) each, 8 downloads at
once on 2 cores cost ~25 % less CPU (see bench/README.md)."""

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,15})[ \t]*\r\n", re.IGNORECASE)
_ENDPOINT = re.compile(r"^tcp://(\[[^\]]+\]|[^:/]+):\d+$")


def endpoint_host(endpoint: str) -> str | None:
    """The host of a ``tcp://host:port`` worker-plane endpoint (where the sealed server listens too)."""
    m = _ENDPOINT.match(endpoint)
    return m.group(1).strip("[]") if m else None


class Stop:
    """Asks a download to stop: after the record it is on, or at once if it waits for bytes (its socket
    is shut down)."""

    def __init__(self):
        self.event = threading.Event()
        self.sock: socket.socket | None = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class Outcome:
    offset: int       # bytes of the blob in the file now
    received: int     # sealed bytes received
    error: str = ""   # why it stopped short ("" when it reached the end)
    final: bool = False  # the server answered, and wrongly (a status, a record): asking again would not help


def download(host: str, port: int, ticket: str, key: bytes, sha: str, total: int, f, h, offset: int,
             stop: Stop) -> Outcome:
    """Append blob ``sha`` (``total`` bytes) from ``offset`` to its end to file ``f``, feeding ``h``."""
    sealer = S.Sealer(key, sha, total)
    index = offset // S.RECORD
    skip = offset - index * S.RECORD
    start = S.record_offset(index)
    out = Outcome(offset, 0)
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
    except OSError as exc:
        out.error = f"cannot reach the sealed server at {host}:{port}: {exc}"
        return out
    stop.sock = sock
    try:
        if stop.is_set():
            out.error = "stopped"
            return out
        # blocking, with the kernel's own timeouts (SO_RCVTIMEO/SO_SNDTIMEO): no poll before every receive
        sock.settimeout(None)
        tv = struct.pack("ll", int(READ_SECONDS), int(READ_SECONDS % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.sendall(f"GET /sealed/{ticket} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={start}-\r\n"
                     "Connection: close\r\n\r\n".encode())
        head, rest = _read_head(sock)
        status = _STATUS.match(head)
        if status is None or status.group(1) not in (b"200", b"206"):
            first = head.split(b"\r\n", 1)[0][:120].decode("latin-1")
            out.error, out.final = f"the sealed server answered {first!r}", True
            return out
        length = _LENGTH.search(head)
        want = S.sealed_size(total) - start
        if length is None or int(length.group(1)) != want:
            out.error = f"the sealed server sends {length and length.group(1)!r} bytes, not the {want} expected"
            return out
        body = bytearray(RECV_RECORDS * (S.RECORD + S.TAG))  # whole records are opened out of it
        plain = bytearray(S.RECORD)
        bview, pview = memoryview(body), memoryview(plain)
        have = min(len(rest), want)
        bview[:have] = rest[:have]
        coming = want - have  # body bytes the server still owes: never read past them
        while out.offset < total and not stop.is_set():
            need = S.record_length(total, index) + S.TAG
            while have < need:  # as much as the socket has, up to the buffer: fewer, bigger receives
                n = sock.recv_into(bview[have:have + min(len(body) - have, coming)])
                if not n:
                    out.error = "the sealed server closed the connection early"
                    return out
                have += n
                coming -= n
            pos = 0
            while have - pos >= need and out.offset < total:
                out.received += need
                n = sealer.open(index, bview[pos:pos + need], plain)
                f.write(pview[skip:n])
                h.update(pview[skip:n])
                out.offset += n - skip
                index, skip, pos = index + 1, 0, pos + need
                need = S.record_length(total, index) + S.TAG
                if stop.is_set():
                    break
            bview[:have - pos] = bview[pos:have]  # a record's beginning: to the front
            have -= pos
        if out.offset < total:
            out.error = "stopped"
        return out
    except S.SealError as exc:
        out.error, out.final = str(exc), True
        return out
    except OSError as exc:  # timeouts included
        out.error = f"sealed download cut: {exc}"
        return out
    finally:
        stop.sock = None
        sock.close()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head (through its blank line) and the body bytes received with it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > HEAD_BYTES:
            raise OSError(f"a response head of more than {HEAD_BYTES} bytes")
        data = sock.recv(HEAD_BYTES)
        if not data:
            raise OSError("the sealed server closed the connection before answering")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    if end > HEAD_BYTES + 4:
        raise OSError(f"a response head of more than {HEAD_BYTES} bytes")
    return buf[:end], buf[end:]
