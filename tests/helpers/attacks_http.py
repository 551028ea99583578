"""The HTTP attacks of the hostile-load mix (tests/helpers/attacks.py): anonymous big POSTs, oversized
JSON, half-sent heads from several addresses."""
from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import Counter

from tests.helpers.attack_kit import (
    BIG,
    HEAD,
    Tally,
    Target,
)


def _status(data: bytes) -> int | None:
    try:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None
    except (IndexError, ValueError):
        return None


def _read_answer(s: socket.socket, timeout: float) -> tuple[int | None, bytes]:
    """Read until the server closes or a response with a Content-Length is complete."""
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, body = data.split(b"\r\n\r\n", 1)
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length" and len(body) >= int(v):
                        return _status(data), body
    except (OSError, ValueError):
        pass
    return _status(data), data.split(b"\r\n\r\n", 1)[-1]


def push_body(port: int, source: str, head: bytes, body_chunks, timeout: float = 20.0) -> tuple[int | None, int]:
    """Send ``head``, then ``body_chunks`` while the server does not answer; returns (status or None, body
    bytes sent before the answer)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(head)
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        chunks = iter(body_chunks)
        try:
            while time.monotonic() < deadline:
                events = sel.select(1.0)
                if any(ev & selectors.EVENT_READ for _, ev in events):
                    return _read_answer(s, 5.0)[0], sent
                if any(ev & selectors.EVENT_WRITE for _, ev in events):
                    chunk = next(chunks, None)
                    if chunk is None:  # all sent: wait for the answer
                        return _read_answer(s, 5.0)[0], sent
                    try:
                        sent += s.send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return _read_answer(s, 1.0)[0], sent
        finally:
            sel.close()
    return None, sent


def _zeros(total: int, piece: int = 64 * 1024):
    block = b"0" * piece
    for _ in range(total // piece):
        yield block


def big_posts(t: Target, stop: threading.Event, tally: Tally, worker: int) -> None:
    tokens = ["", "Authorization: Bearer rh_not-a-token\r\n"]
    n = 0
    while not stop.is_set():
        auth = tokens[(n + worker) % 2]
        head = (f"POST /api/jobs HTTP/1.1\r\nHost: farm\r\n{auth}Content-Type: application/json\r\n"
                f"Content-Length: {BIG}\r\n\r\n").encode()
        try:
            status, sent = push_body(t.http_port, "127.0.0.3", head, _zeros(BIG))
        except OSError as exc:
            tally.add("big_posts", f"error {type(exc).__name__}")
            stop.wait(0.5)
            continue
        tally.add("big_posts", f"status {status}")
        tally.peak("big_posts", "max body bytes sent before the answer", sent)
        n += 1
        stop.wait(0.1)


def oversized_json(t: Target, stop: threading.Event, tally: Tally, worker: int) -> None:
    n = 0
    auth = f"Authorization: Bearer {t.token}\r\n"
    while not stop.is_set():
        try:
            if (n + worker) % 2 == 0:  # declared: refused from the header
                head = (f"POST /api/jobs HTTP/1.1\r\nHost: farm\r\n{auth}Content-Type: application/json\r\n"
                        f"Content-Length: {BIG}\r\n\r\n").encode()
                status, sent = push_body(t.http_port, "127.0.0.4", head, _zeros(BIG))
                kind = "declared 64 MiB"
            else:  # chunked, nothing declared: refused once the limit is read
                head = (f"POST /api/blobs/missing HTTP/1.1\r\nHost: farm\r\n{auth}Content-Type: application/json\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n").encode()
                piece = b"%x\r\n%s\r\n" % (64 * 1024, b"[" * (64 * 1024))
                status, sent = push_body(t.http_port, "127.0.0.4", head, (piece for _ in range(80)))
                kind = "chunked 5 MiB"
        except OSError as exc:
            tally.add("oversized_json", f"error {type(exc).__name__}")
            stop.wait(0.5)
            continue
        tally.add("oversized_json", f"{kind}: status {status}")
        tally.peak("oversized_json", f"{kind}: max body bytes sent before the answer", sent)
        n += 1
        stop.wait(0.1)


def slowloris(t: Target, stop: threading.Event, tally: Tally, per_address: dict[str, int]) -> None:
    """Keep ``per_address`` half-sent heads open; every socket the server closes is opened again (at most
    once a second per address). Counts the answers (503 refused, 408 head deadline, closed silently) and
    the most sockets of one address the server held at once (open, unanswered, for over a second)."""
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float]] = {}
    trickled: dict[socket.socket, float] = {}
    count = Counter()
    next_top_up = 0.0
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_top_up:
                next_top_up = now + 1.0
                for addr, want in per_address.items():
                    for _ in range(want - count[addr]):
                        try:
                            s = socket.create_connection(("127.0.0.1", t.http_port), timeout=2,
                                                         source_address=(addr, 0))
                            s.sendall(HEAD)
                            s.setblocking(False)
                        except OSError as exc:
                            tally.add("slowloris", f"connect {type(exc).__name__}")
                            break
                        opened[s], trickled[s] = (addr, now), now
                        count[addr] += 1
                        sel.register(s, selectors.EVENT_READ)
                        tally.add("slowloris", "opened")
            for key, _ in sel.select(0.2):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                status = _status(data)
                tally.add("slowloris", f"closed by the server: {status or 'without a word'}")
                addr, since = opened.pop(s)
                trickled.pop(s, None)
                count[addr] -= 1
                tally.peak("slowloris", "longest held (s)", round(time.monotonic() - since, 1))
                sel.unregister(s)
                s.close()
            now = time.monotonic()
            held = Counter(addr for s, (addr, since) in opened.items() if now - since > 1.0)
            for addr, n in held.items():
                tally.peak("slowloris", f"most held at once from {addr}", n)
            tally.peak("slowloris", "most held at once, all addresses", sum(held.values()))
            for s, last in list(trickled.items()):
                if now - last >= 2.0:
                    trickled[s] = now
                    try:
                        s.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass
    finally:
        for s in opened:
            s.close()
        sel.close()


