"""Hostile clients of a running coordinator, and the gauges that watch it while they attack (issue 18).

    python -m tests.helpers.attacks --target TARGET.json --report REPORT.json [--scale K] [--attacks a,b,...]

The attacks (:data:`ATTACKS`), each in its own threads of this process, all at once, until its stdin
closes or says ``stop``; it prints ``ready`` once the workers that must hold leases have said READY (so
that the honest job can be submitted after them), and writes what each attack saw to REPORT.json:

* ``big_posts``: anonymous (no token, or a wrong one) ``POST /api/jobs`` declaring 64 MiB, the body streamed
  until the answer comes (expected: 401 from the headers);
* ``oversized_json``: a known creator's ``POST /api/jobs`` declaring 64 MiB (413 from the header) and a
  chunked ``POST /api/blobs/missing`` that streams 5 MiB without declaring it (413 once 4 MiB are read);
* ``slowloris``: hundreds of half-sent request heads, a header line trickled every 2 s, reopened when
  the coordinator closes them; most from one address, about 60 from each of a few more (the per-address
  cap is 64, the global one 512);
* ``blob_flood``: workers (``leech-N``) that take one lease each, then send thousands of BLOB_GETs for its
  input (the job's scene, 117 KB: one chunk) and read nothing more, with the smallest receive queue ZeroMQ
  allows, so that whatever the coordinator queues for them stays in the coordinator (2 × 6,000 chunks
  queued would be 1.4 GB);
* ``hello_flood``: one key saying HELLO with hundreds of fake worker ids on one socket;
* ``throwaway_keys``: hundreds of sockets, each with a fresh CURVE key, one HELLO each (a few of them
  with an honest worker's id);
* ``hoarder``: a worker that takes leases (READY with several slots), heart-beats them, and never makes
  progress;
* ``boasting_hoarders``: hoarders under many fresh worker ids (free on an open farm), one slot each, whose
  HELLO claims 10^8 work units/s (an honest CPU worker here: ~150) and the job's scene in its cache: the scheduler
  weighs them by claimed speed and locality until measured, so together they take nearly every task of a
  new job; with no frame of the job ever measured, a lease without progress is kept LEASE_STALL_SECONDS
  (an hour) instead of LEASE_STALL_MIN;
* ``bomb_image``: the hoarder uploads (BLOB_PUT, under its lease) a 1 KB PNG whose IHDR claims 30000×30000
  and RESULTs it as its task's frame; ``bomb_image_16k``: a 780 KB PNG that really decodes to 16384×16384
  RGB (805 MB of zeros; 16384 is the worker's own resolution cap), where the task asked for 64×48.

The gauges (:class:`RssGauge`, :class:`ConnGauge`, :class:`ApiGauge`, :class:`HeartbeatProbe`) run in the
test's (or the benchmark's) own process, apart from the attackers' GIL; :class:`AttackProcess` starts and
stops the child. Addresses: the attackers use 127.0.1.x (slow
heads), 127.0.0.3 (anonymous bodies), 127.0.0.4 (authenticated ones), 127.0.2.1 (the workers that take
leases), 127.0.2.2 (the HELLO flood) and 127.0.2.3 (the throw-away keys); the API gauge asks from
127.0.0.2 and the heartbeat probe, as the honest workers, connects from 127.0.0.1: the per-address caps
the attackers fill are not the ones the honest clients are measured through.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from common import limits as L
from common import protocol as P
from common.keys import read_public_key

ATTACKS = ("big_posts", "oversized_json", "slowloris", "blob_flood", "hello_flood", "throwaway_keys", "hoarder",
           "boasting_hoarders", "bomb_image", "bomb_image_16k")
LEASE_ATTACKS = {"blob_flood", "hoarder", "boasting_hoarders", "bomb_image", "bomb_image_16k"}
"""Attacks that need leases of the honest job: their workers say READY before it is queued."""
HEAD = b"GET /api/health HTTP/1.1\r\nHost: farm\r\n"
"""A request head that never ends (no blank line)."""
BIG = 64 * 1024 * 1024


@dataclass
class Intensity:
    """How hard each attack pushes at scale 1 (``scaled(k)`` multiplies the counts)."""
    big_posts: int = 4            # anonymous 64 MiB POSTs at once, each sent again once answered
    oversized_json: int = 2       # authenticated oversized requests at once
    slowloris: int = 300          # half-sent heads from 127.0.1.1
    slowloris_spread: int = 3     # more addresses (127.0.1.2…), SLOWLORIS_PER_SPREAD heads each (not scaled)
    leeches: int = 2              # workers that take a lease each, then flood
    blob_gets: int = 6000         # BLOB_GETs of each leech, sent at once
    hello_fakes: int = 300        # fake worker ids on one socket, per round
    throwaway_keys: int = 150     # fresh keys, per round
    hello_rounds: int = 2         # rounds of both HELLO floods, HELLO_ROUND_GAP apart
    hoard_slots: int = 4          # slots the hoarder says it has
    boasters: int = 12            # boasting hoarders (one slot each)

    def scaled(self, k: float) -> Intensity:
        keep = {"slowloris_spread", "hello_rounds"}  # the spread stays under the 512 cap (beyond it: by design)
        return Intensity(**{n: v if n in keep else max(1, round(v * k)) for n, v in asdict(self).items()})


SLOWLORIS_PER_SPREAD = 60
HELLO_ROUND_GAP = 8.0
WORKER_SOURCE = "127.0.2.1"
"""The address the attacking workers connect from (the honest ones, and the probe, use 127.0.0.1): the
coordinator limits CURVE handshakes per address, and an attacker is not on the honest workers' host."""
HELLO_FLOOD_SOURCE, THROWAWAY_SOURCE = "127.0.2.2", "127.0.2.3"


@dataclass
class Target:
    """Where the coordinator is and what an attacker knows of it (JSON-serialisable, for the child)."""
    http_port: int
    endpoint: str
    server_key_file: str
    token: str                    # a creator's own token (the authenticated oversized requests)
    scene_sha256: str             # the honest job's scene (what the leech asks for)
    work: str                     # a folder for the child's files (target, report, log)


class Tally:
    """Counts per attack, from many threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = {}
        self.values: dict[str, dict] = {}

    def add(self, attack: str, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts.setdefault(attack, Counter())[what] += n

    def peak(self, attack: str, what: str, value: float) -> None:
        with self.lock:
            d = self.values.setdefault(attack, {})
            d[what] = max(d.get(what, value), value)

    def note(self, attack: str, what: str, value) -> None:
        with self.lock:
            self.values.setdefault(attack, {})[what] = value

    def report(self) -> dict:
        with self.lock:
            return {a: {**dict(self.counts.get(a, {})), **self.values.get(a, {})}
                    for a in sorted(set(self.counts) | set(self.values))}


# ------------------------------------------------------------------ HTTP
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


# ------------------------------------------------------------------ the worker plane
def dealer(ctx: zmq.Context, t: Target, keypair: tuple[bytes, bytes] | None = None, source: str = "",
           **opts) -> zmq.Socket:
    """A CURVE DEALER that pins the farm's key (an admitted key: the farm on loopback admits 'open'),
    connecting from ``source`` (a loopback address; default: the system's choice, 127.0.0.1)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    for name, value in opts.items():
        s.setsockopt(getattr(zmq, name.upper()), value)
    s.curve_serverkey = read_public_key(t.server_key_file)
    s.curve_publickey, s.curve_secretkey = keypair or zmq.curve_keypair()
    s.connect(t.endpoint.replace("tcp://", f"tcp://{source}:0;") if source else t.endpoint)
    return s


CAPS = {"runtimes": ["assemble", "blender", "encode", "render", "verify"], "engines": ["CYCLES"], "devices": [],
        "gpu": False, "hostname": "attacker", "cached": [], "models": [], "sandbox": "bubblewrap 0.8.0, seccomp"}
"""What an honest CPU worker says of itself (the attackers pass for one)."""


class RawWorker:
    """A worker-plane client speaking the protocol by hand: HELLO, READY, heartbeats (listing the leases it
    holds), and whatever its owner sends; :meth:`pump` receives one message and keeps the heartbeats going."""

    def __init__(self, ctx: zmq.Context, t: Target, worker_id: str, slots: int = 1, caps: dict | None = None,
                 source: str = WORKER_SOURCE, **opts):
        self.ctx, self.t, self.worker_id, self.slots, self.opts = ctx, t, worker_id, slots, {"source": source, **opts}
        self.caps = caps if caps is not None else CAPS
        self.held: dict[tuple[int, int], P.Task] = {}
        self.sock: zmq.Socket | None = None
        self.welcomed = 0
        self.next_hb = 0.0
        self.seen: Counter = Counter()  # messages received, by kind (and CANCEL/DISCONNECT by reason)
        self.acks: dict[tuple[int, int], P.Ack] = {}
        self.connect()

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = dealer(self.ctx, self.t, **self.opts)
        self.send(P.Hello(self.worker_id, "", self.slots, self.caps, [list(k) for k in self.held]))

    def send(self, msg) -> bool:
        try:
            self.sock.send_multipart(P.encode(msg), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def heartbeat(self) -> None:
        now = time.monotonic()
        if self.welcomed and now >= self.next_hb:
            self.next_hb = now + L.HEARTBEAT_INTERVAL
            self.send(P.Heartbeat([list(k) for k in self.held]))

    def pump(self, timeout: float = 0.1):
        """Receive one message (None after ``timeout``), note leases and WELCOMEs, send heartbeats when due."""
        self.heartbeat()
        if not self.sock.poll(int(timeout * 1000)):
            return None
        try:
            msg = P.decode(self.sock.recv_multipart())
        except P.ProtocolError:
            return None
        self.seen[type(msg).__name__.upper()] += 1
        if isinstance(msg, P.Welcome):
            self.welcomed += 1
            self.send(P.Ready(self.slots - len(self.held)))
        elif isinstance(msg, P.Task):
            self.held[(msg.task_id, msg.attempt)] = msg
        elif isinstance(msg, P.Cancel):
            self.held.pop((msg.task_id, msg.attempt), None)
            self.seen[f"CANCEL: {msg.reason[:70]}"] += 1
        elif isinstance(msg, P.Disconnect):
            self.seen[f"DISCONNECT: {msg.reason[:70]}"] += 1
        elif isinstance(msg, P.Ack):
            self.acks[(msg.task_id, msg.attempt)] = msg
        return msg

    def put_blob(self, data: bytes, stop: threading.Event, timeout: float = 30.0) -> str:
        """Upload ``data`` (BLOB_PUT, one chunk at a time, each acked); returns "" or the coordinator's error."""
        sha = hashlib.sha256(data).hexdigest()
        offset, deadline = -1, time.monotonic() + timeout
        self.send(P.BlobPut(sha, 0, len(data), b""))  # the probe: where to resume
        while time.monotonic() < deadline and not stop.is_set():
            msg = self.pump(0.2)
            if not isinstance(msg, P.BlobAck) or msg.sha256 != sha:
                continue
            if msg.error:
                return msg.error
            if msg.done:
                return ""
            if msg.offset != offset:
                offset = msg.offset
                self.send(P.BlobPut(sha, offset, len(data), data[offset:offset + L.BLOB_CHUNK_SIZE]))
        return "no BLOB_ACK in time"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)


def _png(width: int, height: int, color_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(side: int, full: bool) -> bytes:
    """A PNG of side×side pixels. ``full``: RGB whose zlib stream really holds every row (zeros: ~1,000:1,
    built from one flushed block repeated, so it costs no 800 MB of compressing); else RGBA with a few
    rows only (it claims the size, it cannot be decoded)."""
    if not full:
        return _png(side, side, 6, zlib.compress(bytes((1 + side * 4) * 4)))
    rows, row = 64, 1 + side * 3
    c = zlib.compressobj(9)
    first = c.compress(bytes(rows * row)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(rows * row)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every later block
    total = side * row
    adler = ((total % 65521) << 16) | 1  # adler32 of `total` zero bytes
    stream = first + again * (side // rows - 1) + b"\x03\x00" + struct.pack(">I", adler)
    return _png(side, side, 2, stream)


def lease_attackers(t: Target, stop: threading.Event, tally: Tally, wants: set[str], k: Intensity,
                    ready: threading.Event) -> None:
    """The hoarder (and its bombs), the leeches and the boasters, on one thread: all must say READY before
    the honest job is queued, and a leech stops reading once it holds a lease."""
    ctx = zmq.Context.instance()
    hoarder = RawWorker(ctx, t, "hoarder", k.hoard_slots) if "hoarder" in wants else None
    # the leeches: the smallest receive queue, so what the coordinator sends stays in the coordinator
    leeches = [RawWorker(ctx, t, f"leech-{i}", 1, rcvhwm=1, rcvbuf=4096, sndhwm=k.blob_gets + 1000)
               for i in range(k.leeches if "blob_flood" in wants else 0)]
    boast = {**CAPS, "cached": [t.scene_sha256], "benchmark": {"blender": 1e8, "measured_at": time.time(), "key": ""}}
    boasters = [RawWorker(ctx, t, f"boaster-{i}", 1, caps=boast)
                for i in range(k.boasters if "boasting_hoarders" in wants else 0)]
    bombs = [(name, bomb_png(30000, False) if name == "bomb_image" else bomb_png(16384, True))
             for name in ("bomb_image", "bomb_image_16k") if name in wants]
    for name, data in bombs:
        tally.note(name, "file bytes", len(data))
    flooded: set[RawWorker] = set()
    used: set[tuple[int, int]] = set()
    ever: set[tuple[str, int, int]] = set()  # (worker, task, attempt) of every lease held
    bombed: dict[str, tuple[tuple[int, int], float]] = {}  # bomb → (the lease it was sent under, when)
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            if not ready.is_set() and all(w is None or w.welcomed for w in (hoarder, *leeches, *boasters)):
                ready.set()
            for b in boasters:  # READY, heart-beat what they hold, nothing else
                b.pump(0)
                ever.update((b.worker_id, *key) for key in b.held)
            if boasters:
                tally.peak("boasting_hoarders", "most leases held at once", sum(len(b.held) for b in boasters))
            if hoarder is not None:
                msg = hoarder.pump(0.05)
                ever.update(("hoarder", *key) for key in hoarder.held)
                tally.peak("hoarder", "most leases held at once", len(hoarder.held))
                if isinstance(msg, P.Disconnect):
                    hoarder.connect()  # and hoards on
                free = [key for key in hoarder.held if key not in used]
                if bombs and free:  # a bomb under a lease it holds, as the task's frame
                    name, data = bombs.pop(0)
                    key = free[0]
                    used.add(key)
                    task = hoarder.held[key]
                    error = hoarder.put_blob(data, stop)
                    tally.note(name, "upload", error or "stored")
                    frames = task.spec.get("frames") or [0]
                    outputs = [{"name": n, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "frame": int(frames[min(i, len(frames) - 1)]), "seconds": 0.5}
                               for i, n in enumerate(task.spec.get("outputs", []))]
                    hoarder.send(P.Result(task.task_id, task.attempt, outputs, 0.5))
                    hoarder.held.pop(key, None)  # a worker forgets a task once its RESULT is sent
                    bombed[name] = (key, time.monotonic())
                for name, (key, sent) in list(bombed.items()):
                    ack = hoarder.acks.get(key)
                    if ack is not None:
                        del bombed[name]
                        tally.note(name, "ACK accepted", ack.accepted)
                        tally.note(name, "ACK reason", ack.reason[:300])
                        tally.note(name, "seconds to the ACK", round(time.monotonic() - sent, 2))
            for leech in leeches:
                if leech in flooded:
                    leech.heartbeat()  # alive, and reading nothing
                    continue
                msg = leech.pump(0.01)
                if isinstance(msg, P.Task) or (msg is None and time.monotonic() - t0 > 30):
                    flooded.add(leech)
                    tally.add("blob_flood", "leeches that held a lease" if leech.held else "leeches without a lease")
                    sent = sum(leech.send(P.BlobGet(t.scene_sha256, 0, L.BLOB_CHUNK_SIZE)) for _ in range(k.blob_gets))
                    tally.add("blob_flood", "BLOB_GETs sent", sent)
                    tally.add("blob_flood", "BLOB_GETs not queued (own HWM)", k.blob_gets - sent)
            if hoarder is None:
                stop.wait(0.02)
    finally:
        for name, (key, sent) in bombed.items():
            tally.note(name, "ACK accepted", None)
            tally.note(name, "ACK reason", f"no ACK {time.monotonic() - sent:.0f} s after the RESULT")
        if boasters:
            tally.note("boasting_hoarders", "distinct leases", len([e for e in ever if e[0] != "hoarder"]))
            tally.note("boasting_hoarders", "messages", dict(sum((b.seen for b in boasters), Counter())))
            for b in boasters:
                b.close()
        if hoarder is not None:
            tally.note("hoarder", "distinct leases", len([e for e in ever if e[0] == "hoarder"]))
            tally.note("hoarder", "messages", dict(hoarder.seen))
            hoarder.close()
        for leech in leeches:
            tally.note("blob_flood", f"{leech.worker_id}: messages read before the flood", dict(leech.seen))
            leech.close()


def hello_flood(t: Target, stop: threading.Event, tally: Tally, k: Intensity) -> None:
    ctx = zmq.Context.instance()
    keypair = zmq.curve_keypair()
    for rnd in range(k.hello_rounds):
        if stop.is_set():
            return
        s = dealer(ctx, t, keypair, HELLO_FLOOD_SOURCE, sndhwm=k.hello_fakes + 100, rcvhwm=k.hello_fakes + 100)
        t0 = time.monotonic()
        for i in range(k.hello_fakes):
            s.send_multipart(P.encode(P.Hello(f"sybil-{rnd}-{i}", "", 4, CAPS)))
        got = 0
        deadline = time.monotonic() + 10
        while got < k.hello_fakes and time.monotonic() < deadline and not stop.is_set():
            if s.poll(200):
                msg = P.decode(s.recv_multipart())
                got += 1
                tally.add("hello_flood", f"{type(msg).__name__.upper()}")
        tally.peak("hello_flood", "slowest round: seconds to all replies", round(time.monotonic() - t0, 2))
        tally.add("hello_flood", "HELLOs sent", k.hello_fakes)
        s.close(0)
        stop.wait(HELLO_ROUND_GAP)


def throwaway_keys(t: Target, stop: threading.Event, tally: Tally, k: Intensity) -> None:
    ctx = zmq.Context.instance()
    for rnd in range(k.hello_rounds):
        t0 = time.monotonic()
        for batch in range(0, k.throwaway_keys, 50):
            if stop.is_set():
                return
            socks = []
            for i in range(batch, min(batch + 50, k.throwaway_keys)):
                s = dealer(ctx, t, source=THROWAWAY_SOURCE)
                impostor = i % 25 == 0
                wid = ("w1", "w2")[(i // 25) % 2] if impostor else f"drifter-{rnd}-{i}"
                s.send_multipart(P.encode(P.Hello(wid, "", 1, CAPS)))
                socks.append((s, impostor))
            deadline = time.monotonic() + 10
            for s, impostor in socks:
                if s.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    msg = P.decode(s.recv_multipart())
                    tally.add("throwaway_keys", f"{'impostor' if impostor else 'fake'}: {type(msg).__name__.upper()}")
                else:
                    tally.add("throwaway_keys", f"{'impostor' if impostor else 'fake'}: no reply in 10 s")
                s.close(0)
        tally.peak("throwaway_keys", "slowest round (s)", round(time.monotonic() - t0, 2))
        stop.wait(HELLO_ROUND_GAP)


# ------------------------------------------------------------------ running the mix
def start(t: Target, wants: set[str], k: Intensity, stop: threading.Event, tally: Tally) -> tuple[list, threading.Event]:
    """Start the attacks in ``wants`` in threads; returns the threads and the event set once the lease
    attackers are READY (set at once when there are none)."""
    threads, ready = [], threading.Event()

    def spawn(fn, *args):
        th = threading.Thread(target=fn, args=(t, stop, tally, *args), daemon=True, name=fn.__name__)
        th.start()
        threads.append(th)
    if wants & LEASE_ATTACKS:
        spawn(lease_attackers, wants | ({"hoarder"} if wants & {"bomb_image", "bomb_image_16k"} else set()), k, ready)
    else:
        ready.set()
    if "big_posts" in wants:
        for i in range(k.big_posts):
            spawn(big_posts, i)
    if "oversized_json" in wants:
        for i in range(k.oversized_json):
            spawn(oversized_json, i)
    if "slowloris" in wants:
        spread = {f"127.0.1.{2 + i}": SLOWLORIS_PER_SPREAD for i in range(k.slowloris_spread)}
        spawn(slowloris, {"127.0.1.1": k.slowloris, **spread})
    if "hello_flood" in wants:
        spawn(hello_flood, k)
    if "throwaway_keys" in wants:
        spawn(throwaway_keys, k)
    return threads, ready


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.attacks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="a JSON file of Target's fields")
    ap.add_argument("--report", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args(argv)
    t = Target(**json.loads(Path(args.target).read_text()))
    wants = {a for a in args.attacks.split(",") if a}
    unknown = wants - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}: choose among {', '.join(ATTACKS)}")
    k = Intensity().scaled(args.scale)
    stop, tally = threading.Event(), Tally()
    threads, ready = start(t, wants, k, stop, tally)
    if not ready.wait(60):
        print("the lease attackers got no WELCOME in 60 s", file=sys.stderr, flush=True)
    print("ready", flush=True)
    t0 = time.monotonic()
    for line in sys.stdin:  # until EOF or "stop"
        if line.strip() == "stop":
            break
    stop.set()
    for th in threads:
        th.join(30)
    rep = tally.report()
    rep["_run"] = {"seconds": round(time.monotonic() - t0, 1), "attacks": sorted(wants), "intensity": asdict(k),
                   "threads left running": [th.name for th in threads if th.is_alive()]}
    Path(args.report).write_text(json.dumps(rep, indent=1, sort_keys=True))
    return 0


# ------------------------------------------------------------------ gauges (in the watching process)
class _Loop(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True, name=type(self).__name__)
        self.interval, self.halt = interval, threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            self.sample()
            self.halt.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


class RssGauge(_Loop):
    """The coordinator process's resident memory (VmRSS of /proc/PID/status) every 0.2 s."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(interval)
        self.pid, self.samples = pid, []  # (monotonic time, bytes)

    def sample(self) -> None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append((time.monotonic(), int(line.split()[1]) * 1024))
        except OSError:
            pass

    @property
    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)


class ConnGauge(_Loop):
    """The TCP connections the coordinator process holds on its HTTP port, by peer address, every 0.5 s
    (its /proc/PID/fd sockets looked up in /proc/net/tcp), seen from the coordinator's side. ``most``: the
    most held at once that had been open for HELD_FOR seconds or more (what the caps bound: a refused
    connection is answered and closed on the event loop's next turn); ``most_any``: the most at once,
    refused ones included (descriptors held for a loop turn)."""
    HELD_FOR = 1.0

    def __init__(self, pid: int, port: int, interval: float = 0.5):
        super().__init__(interval)
        self.pid, self.port = pid, port
        self.seen: dict[str, float] = {}  # socket inode → when first seen
        self.most: Counter = Counter()
        self.most_any: Counter = Counter()
        self.most_total = self.most_any_total = 0

    def sample(self) -> None:
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return
        now = time.monotonic()
        held, any_ = Counter(), Counter()
        seen = {}
        for line in lines:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], f[9]
            if state == "01" and int(local.split(":")[1], 16) == self.port and inode in inodes:
                addr = socket.inet_ntoa(struct.pack("<I", int(remote.split(":")[0], 16)))
                seen[inode] = self.seen.get(inode, now)
                any_[addr] += 1
                if now - seen[inode] >= self.HELD_FOR:
                    held[addr] += 1
        self.seen = seen
        for addr in any_:
            self.most[addr] = max(self.most[addr], held[addr])
            self.most_any[addr] = max(self.most_any[addr], any_[addr])
        self.most_total = max(self.most_total, sum(held.values()))
        self.most_any_total = max(self.most_any_total, sum(any_.values()))


class ApiGauge(_Loop):
    """An authenticated GET on a fresh connection (from ``source``) every 0.5 s: (time, seconds to the whole
    answer or None when there was none within ``timeout``, status)."""

    def __init__(self, port: int, token: str, path: str, source: str = "127.0.0.2", interval: float = 0.5,
                 timeout: float = 10.0):
        super().__init__(interval)
        self.port, self.token, self.path, self.source, self.timeout = port, token, path, source, timeout
        self.samples: list[tuple[float, float | None, int | None]] = []

    def sample(self) -> None:
        t0 = time.monotonic()
        status = None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout,
                                          source_address=(self.source, 0)) as s:
                s.sendall(f"GET {self.path} HTTP/1.1\r\nHost: farm\r\nAuthorization: Bearer {self.token}\r\n"
                          "Connection: close\r\n\r\n".encode())
                status, _ = _read_answer(s, self.timeout)
        except OSError:
            pass
        took = time.monotonic() - t0
        self.samples.append((t0, took if status is not None else None, status))

    def latencies(self) -> list[float]:
        return [x for _, x, st in self.samples if x is not None and st == 200]

    def summary(self) -> dict:
        lat = sorted(self.latencies())
        bad = [(round(x, 2) if x is not None else None, st) for _, x, st in self.samples if x is None or st != 200]
        return {"samples": len(self.samples), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                "max": lat[-1] if lat else None, "not answered 200": bad[:20], "not answered count": len(bad)}


class HeartbeatProbe(threading.Thread):
    """An honest raw worker that takes no work (no READY): it heart-beats every interval and records the
    gaps between the coordinator's HEARTBEATs (every worker's view of whether the coordinator is alive; 3
    intervals of silence and an honest worker reconnects) and any DISCONNECT it gets (presumed dead)."""

    def __init__(self, t: Target, worker_id: str = "probe"):
        super().__init__(daemon=True, name="HeartbeatProbe")
        self.t, self.worker_id, self.halt = t, worker_id, threading.Event()
        self.beats: list[float] = []
        self.disconnects: list[str] = []
        self.welcomed = threading.Event()

    def run(self) -> None:
        w = RawWorker(zmq.Context.instance(), self.t, self.worker_id, 1, caps={"runtimes": [], "cached": []},
                      source="")
        try:
            while not self.halt.is_set():
                msg = w.pump(0.05)
                if isinstance(msg, P.Welcome):
                    self.welcomed.set()
                    self.beats.append(time.monotonic())
                elif isinstance(msg, P.Heartbeat):
                    self.beats.append(time.monotonic())
                elif isinstance(msg, P.Disconnect):
                    self.disconnects.append(msg.reason)
                    w.connect()
        finally:
            w.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(10)

    def gaps(self, since: float = 0.0, until: float | None = None) -> list[tuple[float, float]]:
        """(when it began, seconds) of every silence between two heartbeats after ``since``, longest first."""
        beats = [b for b in self.beats if b >= since and (until is None or b <= until)]
        return sorted(((a, b - a) for a, b in itertools.pairwise(beats)), key=lambda g: -g[1])

    def max_gap(self, since: float = 0.0, until: float | None = None) -> float:
        gaps = self.gaps(since, until)
        return gaps[0][1] if gaps else 0.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


@dataclass
class AttackProcess:
    """The attacks of :func:`main` in a child process (its own GIL); :meth:`stop` returns its report."""
    target: Target
    attacks: set[str]
    scale: float = 1.0
    proc: object = None
    report_file: Path = field(default=None)

    def start(self, timeout: float = 90.0) -> AttackProcess:
        import subprocess
        work = Path(self.target.work)
        work.mkdir(parents=True, exist_ok=True)
        (work / "target.json").write_text(json.dumps(asdict(self.target)))
        self.report_file = work / "attack-report.json"
        repo = Path(__file__).resolve().parents[2]
        with open(work / "attacks.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.attacks", "--target", str(work / "target.json"), "--report",
                 str(self.report_file), "--scale", str(self.scale), "--attacks", ",".join(sorted(self.attacks))],
                cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:  # "ready": the lease attackers said READY
            line = self.proc.stdout.readline()
            if line.strip() == b"ready":
                return self
        self.proc.kill()
        self.proc.wait(10)
        raise RuntimeError(f"the attack process did not get ready: {line!r}, see {work / 'attacks.log'}")

    def stop(self, timeout: float = 60.0) -> dict:
        import subprocess
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
            self.proc.wait(timeout)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        return json.loads(self.report_file.read_text()) if self.report_file.exists() else {}


if __name__ == "__main__":
    sys.exit(main())
