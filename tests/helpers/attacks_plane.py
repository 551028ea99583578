"""The worker-plane attacks of the hostile-load mix (tests/helpers/attacks.py): raw CURVE workers that
flood BLOB_GETs unread, hoard and boast, upload bomb images; HELLO floods and throw-away keys."""
from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections import Counter

import zmq

from common import limits as L
from common import protocol as P
from common.keys import read_public_key
from tests.helpers.attack_kit import (
    HELLO_FLOOD_SOURCE,
    HELLO_ROUND_GAP,
    THROWAWAY_SOURCE,
    WORKER_SOURCE,
    Intensity,
    Tally,
    Target,
)


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
                self.send(P.BlobPut(sha, offset, len(data), data[offset:offset + L.UPLOAD_CHUNK_SIZE]))
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


