"""The gauges of the hostile-load test and bench, in the watching process: the coordinator's RSS and
HTTP connections (from /proc), API latency from a fresh connection, and a raw honest worker's heartbeats."""
from __future__ import annotations

import itertools
import os
import socket
import statistics
import struct
import threading
import time
from collections import Counter
from pathlib import Path

import zmq

from common import protocol as P
from tests.helpers.attack_kit import (
    Target,
)
from tests.helpers.attacks_http import _read_answer
from tests.helpers.attacks_plane import RawWorker


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
        # by inode: /proc/net/tcp is printed a page at a time without a lock on the table, so a socket can
        # be listed twice in one read while hundreds of others open and close (CI saw 68 "held" from an
        # address that never had more than 60 open)
        peers: dict[str, str] = {}
        for line in lines:
            f = line.split()
            local, remote, state, inode = f[1], f[2], f[3], f[9]
            if state == "01" and int(local.split(":")[1], 16) == self.port and inode in inodes:
                peers[inode] = socket.inet_ntoa(struct.pack("<I", int(remote.split(":")[0], 16)))
        held, any_ = Counter(), Counter()
        seen = {}
        for inode, addr in peers.items():
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


