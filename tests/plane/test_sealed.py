"""The sealed blob channel, for real: a Broker + Coordinator with a SealedChannel, its SealedServer on a random
loopback port, and WorkerDaemons fetching big inputs from it (tests/plane/test_blob_transfer.py's Plane).

What it must hold: a big input reaches every worker intact, sealed once and sent by sendfile; only ticket
holders get bytes, and only ciphertext; bytes changed on the way or on disk never reach a worker's file;
whatever the sealed download does not bring comes as BLOB chunks; and strangers on the port are bounded
(connections, heads, stalled readers)."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq.asyncio

from common import protocol as P
from common import sealed as S
from farm.core.coordinator import Coordinator
from farm.core.scheduler import Scheduler
from farm.plane import sealed_http
from farm.plane.broker import Broker
from farm.plane.sealed_http import SealedServer
from farm.server import sealed_address
from farm.store.sealed import SealedChannel
from tests.plane.test_blob_transfer import Plane, until
from worker import sealed_fetch
from worker import transfer as T

MiB = 1024 * 1024


class SealedPlane(Plane):
    def __init__(self, root: Path, with_server: bool = True):
        super().__init__(root)
        self.channel = SealedChannel(self.blobs)
        self.coord = Coordinator(self.engine, self.blobs, Scheduler(seed=0), verify=False, sealed=self.channel)
        self.with_server = with_server

    async def __aenter__(self):
        self.ctx = zmq.asyncio.Context()
        self.broker = Broker(self.coord, "tcp://127.0.0.1:0", ctx=self.ctx)
        self.broker_task = asyncio.create_task(self.broker.run())
        self.endpoint = await self.broker.ready()
        self.server = SealedServer(self.channel, "127.0.0.1", 0)
        if self.with_server:
            await self.server.start()
        return self

    async def __aexit__(self, *exc):
        try:
            await super().__aexit__(*exc)
        finally:
            await self.server.stop()
            self.channel.close()


def run(tmp_path: Path, body, timeout: float = 60.0, **kw):
    async def main():
        async with SealedPlane(tmp_path, **kw) as plane:
            await asyncio.wait_for(body(plane), timeout)
    asyncio.run(main())


def big(n: int = 20 * MiB + 12345) -> bytes:
    return os.urandom(n)


# ------------------------------------------------------------------ the format
@pytest.mark.parametrize("size", [1, S.RECORD - 1, S.RECORD, S.RECORD + 1, 3 * S.RECORD - 5])
def test_records_open_only_as_sealed_where_sealed(size):
    data = os.urandom(size)
    sha, other = "ab" * 32, "cd" * 32
    key = os.urandom(32)
    sealer = S.Sealer(key, sha, size)
    out, plain = bytearray(S.RECORD + S.TAG), bytearray(S.RECORD)
    sealed = []
    for i in range(S.records(size)):
        n = sealer.seal(i, data[i * S.RECORD:(i + 1) * S.RECORD], out)
        sealed.append(bytes(out[:n]))
    assert sum(map(len, sealed)) == S.sealed_size(size)
    opened = b"".join(bytes(plain[:sealer.open(i, r, plain)]) for i, r in enumerate(sealed))
    assert opened == data
    flipped = bytearray(sealed[-1])
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(S.SealError, match="failed its tag"):
        sealer.open(len(sealed) - 1, bytes(flipped), plain)
    with pytest.raises(S.SealError):  # another blob's key and name
        S.Sealer(S.blob_key(os.urandom(32), other), other, size).open(0, sealed[0], plain)
    with pytest.raises(S.SealError):  # the same key, another blob's name (associated data)
        S.Sealer(key, other, size).open(0, sealed[0], plain)
    with pytest.raises(S.SealError):  # cut short
        sealer.open(len(sealed) - 1, sealed[-1][:-1], plain)
    if len(sealed) > 1:
        with pytest.raises(S.SealError):  # a record moved to another position
            sealer.open(1, sealed[0], plain)


def test_sealed_address_follows_the_worker_plane_and_never_takes_the_api_port():
    assert sealed_address("tcp://0.0.0.0:5555", "auto", "0.0.0.0:8000") == ("0.0.0.0", 5556)
    assert sealed_address("tcp://127.0.0.1:5555", "auto", "127.0.0.1:5556") == ("127.0.0.1", 5557)
    assert sealed_address("tcp://127.0.0.1:0", "auto") == ("127.0.0.1", 0)
    assert sealed_address("tcp://[::1]:5555", "7000") == ("::1", 7000)
    assert sealed_address("tcp://127.0.0.1:5555", "10.0.0.2:7000") == ("10.0.0.2", 7000)
    assert sealed_address("tcp://127.0.0.1:5555", "off") is None
    with pytest.raises(ValueError, match="auto, off, a port"):
        sealed_address("tcp://127.0.0.1:5555", "yes")


# ------------------------------------------------------------------ workers fetching
def test_a_big_input_is_sealed_once_and_reaches_every_worker_intact(tmp_path):
    data = big()

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        await until(lambda: p.channel.digest(sha), what="the blob sealed as it was stored")
        ds = [await p.daemon(f"c{i}", worker_id=f"w{i}") for i in range(3)]
        for d in ds:
            await p.need(d, sha)
        paths = await asyncio.gather(*(d.fetch(sha) for d in ds))
        for d, path in zip(ds, paths):
            assert path.read_bytes() == data
            assert d.stats["bytes_downloaded"] == len(data)
            # all but the first BLOB chunk (asked with the TICKET_GET) came sealed
            assert d.stats["bytes_sealed"] == S.sealed_size(len(data)) - S.record_offset(1)
        assert p.coord.stats["chunks_out"] == 3, "one BLOB chunk a worker: the rest went by sendfile"
        st = p.channel.stats
        assert st["sealed_bytes"] == S.sealed_size(len(data)), "sealed once for all three"
        assert st["tickets"] == 3 and st["streams"] == 3
        assert (p.channel.dir / sha).stat().st_size == S.sealed_size(len(data))
        assert p.server.open == 0
        assert data[:4096] not in (p.channel.dir / sha).read_bytes(), "the file sent is ciphertext"

    run(tmp_path, body)


@pytest.mark.parametrize("size, server", [(S.MIN_BYTES - 1, True), (9 * MiB, False)],
                         ids=["a small input", "no sealed server"])
def test_blob_chunks_carry_small_inputs_and_all_inputs_without_a_sealed_server(tmp_path, size, server):
    data = big(size)

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        d = await p.daemon()
        await p.need(d, sha)
        assert (await d.fetch(sha)).read_bytes() == data
        assert d.stats["bytes_sealed"] == 0 and p.channel.stats["tickets"] == 0
        assert p.coord.stats["chunks_out"] == -(-size // MiB)
        assert not any(p.channel.dir.iterdir()), "nothing sealed"

    run(tmp_path, body, with_server=server)


def test_a_coordinator_that_does_not_know_ticket_get_costs_no_wait(tmp_path):
    """An older coordinator answers TICKET_GET with ERROR: the worker takes BLOB chunks at once and asks no
    more on that connection."""
    data = big(9 * MiB)

    async def body(p: SealedPlane):
        del p.coord._handlers[P.TicketGet]  # what a coordinator without the message answers: an ERROR
        sha = p.blobs.write_bytes(data)
        d = await p.daemon()
        await p.need(d, sha)
        t0 = time.monotonic()
        assert (await d.fetch(sha)).read_bytes() == data
        assert time.monotonic() - t0 < T.TICKET_WAIT, "it did not wait out TICKET_WAIT"
        assert not d.transfers.sealed_ok and d.stats["bytes_sealed"] == 0

    run(tmp_path, body)


def test_a_big_blob_a_creator_stores_is_sealed_before_any_worker_asks(tmp_path):
    data = big()

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)  # what PUT /api/blobs and a finished resumable upload do
        await until(lambda: (p.channel.dir / sha).exists(), what="the blob sealed")
        assert p.channel.stats["tickets"] == 0 and p.channel.stats["sealed_bytes"] == S.sealed_size(len(data))
        d = await p.daemon()
        await p.need(d, sha)
        assert (await d.fetch(sha)).read_bytes() == data
        assert p.channel.stats["sealed_bytes"] == S.sealed_size(len(data)), "not sealed again"
        small = p.blobs.write_bytes(os.urandom(1000))
        await asyncio.sleep(0.1)
        assert not (p.channel.dir / small).exists() and not (p.channel.dir / f"{small}.part").exists()

    run(tmp_path, body)


def test_bytes_changed_on_the_coordinators_disk_never_reach_a_worker(tmp_path):
    data = big()

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        d1 = await p.daemon("c1", worker_id="w1")
        await p.need(d1, sha)
        assert (await d1.fetch(sha)).read_bytes() == data
        sealed = p.channel.dir / sha
        with open(sealed, "r+b") as f:  # a bit flipped in record 5 of the sealed file
            f.seek(S.record_offset(5) + 1000)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
        d2 = await p.daemon("c2", worker_id="w2")
        await p.need(d2, sha)
        assert (await d2.fetch(sha)).read_bytes() == data, "the rest came as BLOB chunks"
        assert d2.stats["bytes_sealed"] == S.record_offset(5) - S.record_offset(1) + S.RECORD + S.TAG
        assert p.coord.stats["chunks_out"] == 1 + 1 + (len(data) - 5 * MiB) // MiB + 1

    run(tmp_path, body)


def test_a_sealed_download_is_checked_against_the_digest_its_ticket_carries(tmp_path, monkeypatch):
    """The coordinator takes the BLAKE3 of a blob as it seals it and TICKET carries it; the worker checks
    its file against that digest (not the sha256 of the name): a wrong digest fails a download whose
    every byte is right, and the file never enters the cache."""
    import blake3
    data = big()

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        await until(lambda: p.channel.digest(sha), what="the blob sealed as it was stored")
        assert p.channel.digest(sha) == blake3.blake3(data).digest()
        d1 = await p.daemon("c1", worker_id="w1")
        await p.need(d1, sha)
        assert (await d1.fetch(sha)).read_bytes() == data
        monkeypatch.setattr(p.channel, "digest", lambda sha: bytes(32))
        d2 = await p.daemon("c2", worker_id="w2")
        await p.need(d2, sha)
        with pytest.raises(T.TaskFailure, match="the digest its sealed channel gave"):
            await d2.fetch(sha)
        assert not d2.cache.has(sha) and not d2.cache.partial(sha).exists()

    run(tmp_path, body)


@pytest.mark.parametrize("late", ["right", "wrong", "none"])
def test_a_blob_sealed_while_it_is_fetched_is_checked_against_the_digest_asked_at_the_end(tmp_path, late,
                                                                                           monkeypatch):
    """Sealed on its first download (not when stored: after a restart, a worker's output), so the TICKET
    has no digest yet: the worker asks again at the end, and checks the file against that digest, or,
    without one, against its sha256 read back from the file."""
    data = big(9 * MiB)

    async def body(p: SealedPlane):
        p.blobs.stored_hook = None
        sha = p.blobs.write_bytes(data)
        real = p.channel.digest
        answers = {"right": real, "wrong": lambda sha: bytes(32), "none": lambda sha: b""}[late]
        asked = []
        monkeypatch.setattr(p.channel, "digest", lambda sha: (asked.append(sha) or (b"" if len(asked) == 1
                                                                                    else answers(sha))))
        d = await p.daemon("c1", worker_id="w1")
        await p.need(d, sha)
        if late == "wrong":
            with pytest.raises(T.TaskFailure, match="the digest its sealed channel gave"):
                await d.fetch(sha)
            assert not d.cache.has(sha)
        else:
            assert (await d.fetch(sha)).read_bytes() == data
        assert len(asked) == 2 and p.channel.stats["tickets"] == 2, "a second TICKET_GET, at the end"
        assert d.stats["bytes_sealed"] == S.sealed_size(len(data)) - S.record_offset(1)
        assert real(sha) == __import__("blake3").blake3(data).digest()

    run(tmp_path, body)


def test_another_holder_of_the_key_cannot_slip_in_other_bytes(tmp_path):
    """Every worker with a lease of a blob gets its key, so one of them between another worker and the
    coordinator can seal other bytes under it: every record then opens, and the digest from the
    coordinator (over CurveZMQ) is what refuses them."""
    data = big(9 * MiB)
    forged = bytearray(data)
    forged[5 * MiB] ^= 1

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        await until(lambda: p.channel.digest(sha), what="the blob sealed as it was stored")
        sealer = S.Sealer(p.channel.key(sha), sha, len(data))
        out = bytearray(S.RECORD + S.TAG)
        body_ = b"".join(bytes(out[:sealer.seal(i, forged[i * S.RECORD:(i + 1) * S.RECORD], out)])
                         for i in range(1, S.records(len(data))))
        mitm = OneShot(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(body_) + body_)
        p.channel.port = mitm.port  # the worker's sealed connection reaches the forger
        d = await p.daemon("c1", worker_id="w1")
        await p.need(d, sha)
        with pytest.raises(T.TaskFailure, match="failed its hash check"):
            await d.fetch(sha)
        assert d.stats["bytes_sealed"] == len(body_), "every forged record opened under the blob's key"
        assert not d.cache.has(sha) and not d.cache.partial(sha).exists()

    run(tmp_path, body)


def test_a_blob_changed_on_disk_before_it_is_sealed_never_completes_a_sealed_download(tmp_path):
    """Sealing hashes what it reads and writes the last record only if the sha256 matches: the worker's
    sealed download stops before it, the rest comes as BLOB chunks, the sha256 check refuses the file."""
    data = big(9 * MiB)

    async def body(p: SealedPlane):
        p.blobs.stored_hook = None  # sealed on the first ticket, after the change below
        sha = p.blobs.write_bytes(data)
        with open(p.blobs.path(sha), "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"\0" * 16)
        d = await p.daemon("c1", worker_id="w1")
        await p.need(d, sha)
        with pytest.raises(T.TaskFailure, match="failed its hash check"):
            await d.fetch(sha)
        assert not d.cache.has(sha)
        assert d.stats["bytes_sealed"] < S.sealed_size(len(data)) - S.record_offset(1)
        assert p.channel.digest(sha) == b"" and not (p.channel.dir / sha).exists()

    run(tmp_path, body)


def test_an_interrupted_sealed_download_resumes_from_its_partial_file(tmp_path):
    data = big()

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        d1, part = await p.interrupted_fetch(sha, 6 * MiB)
        have = part.stat().st_size
        await asyncio.sleep(0.2)
        assert part.stat().st_size == have, "the download thread stopped when its task did"
        assert have < len(data) and not d1.cache.has(sha)
        await p.kill(d1)
        d2 = await p.daemon(worker_id="w1")
        await p.need(d2, sha)
        assert (await d2.fetch(sha)).read_bytes() == data and not part.exists()
        assert d2.stats["bytes_downloaded"] == len(data) - have, "resumed where the file stood"

    run(tmp_path, body)


def test_tickets_go_only_to_lease_holders_and_die_with_their_connection(tmp_path):
    data = big(9 * MiB)

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(data)
        d = await p.daemon(worker_id="w1")
        await until(lambda: d.stats["welcomes"] > 0, what="WELCOME")
        got: list = []
        d.transfers.deliver_ticket = got.append
        d.send(P.TicketGet(sha))  # no lease names it
        await until(lambda: got, what="TICKET")
        assert got[0].error.startswith("not an input") and not got[0].key and not p.channel.tickets
        await p.need(d, sha)
        d.send(P.TicketGet(sha))
        await until(lambda: len(got) == 2, what="TICKET")
        t = got[1]
        assert not t.error and t.key == p.channel.key(sha) and t.port == p.server.port and t.total == len(data)
        assert p.channel.ticket(t.ticket) is not None
        await p.kill(d)
        await until(lambda: p.channel.ticket(t.ticket) is None, timeout=15, what="the ticket voided")
        status, _ = await asyncio.to_thread(http_get, p.server.port, f"/sealed/{t.ticket}")
        assert status == 403

    run(tmp_path, body)


# ------------------------------------------------------------------ strangers on the port
def http_get(port: int, path: str, extra: str = "", read: int = 1 << 16) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return 0, buf
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        while len(body) < read and (chunk := s.recv(65536)):
            body += chunk
        return int(head.split()[1]), body


def issue(p: SealedPlane, sha: str, size: int) -> str:
    return p.channel.issue(b"ident", sha, size)


def test_the_server_answers_strangers_without_opening_anything(tmp_path):
    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(big(9 * MiB))
        port = p.server.port
        for path, want in (("/sealed/" + "A" * 32, 403), ("/etc/passwd", 400), ("/sealed/../../x", 400)):
            status, text = await asyncio.to_thread(http_get, port, path)
            assert status == want, (path, status, text)
        assert b"ask the coordinator for a new one" in (await asyncio.to_thread(http_get, port, "/sealed/" + "A" * 32))[1]
        assert p.channel.stats["streams"] == 0, "no file was opened for a request without a live ticket"
        name = issue(p, sha, 9 * MiB)
        status, text = await asyncio.to_thread(http_get, port, f"/sealed/{name}", "Range: bytes=7-\r\n")
        assert status == 416 and b"record" in text
        p.channel.clock = lambda: time.monotonic() + 10_000  # past its expiry
        assert (await asyncio.to_thread(http_get, port, f"/sealed/{name}"))[0] == 403
        assert p.server.open == 0

    run(tmp_path, body)


def test_slow_and_oversized_heads_are_cut_within_their_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(sealed_http, "HEAD_SECONDS", 0.5)

    async def body(p: SealedPlane):
        def slow() -> float:
            with socket.create_connection(("127.0.0.1", p.server.port), timeout=10) as s:
                s.sendall(b"GET /sealed/")
                t0 = time.monotonic()
                assert s.recv(100) == b""  # closed, unanswered
                return time.monotonic() - t0

        def huge() -> bytes:
            with socket.create_connection(("127.0.0.1", p.server.port), timeout=10) as s:
                try:
                    s.sendall(b"GET /sealed/x HTTP/1.1\r\nX: " + b"a" * 64 * 1024)
                except OSError:
                    pass
                try:
                    return s.recv(100)
                except ConnectionResetError:  # closed with the head unread
                    return b""

        took = await asyncio.to_thread(slow)
        assert 0.4 < took < 3.0
        assert await asyncio.to_thread(huge) == b""
        await until(lambda: p.server.open == 0, what="connections closed")

    run(tmp_path, body)


def test_connections_and_downloads_a_ticket_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(sealed_http, "MAX_CONNECTIONS", 4)

    async def body(p: SealedPlane):
        idle = [socket.create_connection(("127.0.0.1", p.server.port)) for _ in range(4)]
        try:
            await until(lambda: p.server.open == 4, what="4 connections open")
            status, text = await asyncio.to_thread(http_get, p.server.port, "/sealed/" + "A" * 32)
            assert status == 503 and b"too many" in text
        finally:
            for s in idle:
                s.close()
        await until(lambda: p.server.open == 0, what="connections closed")
        sha = p.blobs.write_bytes(big(40 * MiB))
        name = issue(p, sha, 40 * MiB)
        readers = []
        for _ in range(2):  # two downloads that read their head, then nothing
            s = socket.create_connection(("127.0.0.1", p.server.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /sealed/{name} HTTP/1.1\r\n\r\n".encode())
            readers.append(s)
        try:
            await until(lambda: p.channel.tickets[name].streams == 2, what="2 downloads")
            status, text = await asyncio.to_thread(http_get, p.server.port, f"/sealed/{name}")
            assert status == 503 and b"downloads open" in text
        finally:
            for s in readers:
                s.close()

    run(tmp_path, body)


def test_a_reader_that_stops_reading_is_dropped_after_the_stall_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(sealed_http, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(sealed_http, "SEGMENT", 1 * MiB)

    async def body(p: SealedPlane):
        sha = p.blobs.write_bytes(big(40 * MiB))
        name = issue(p, sha, 40 * MiB)
        s = socket.create_connection(("127.0.0.1", p.server.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /sealed/{name} HTTP/1.1\r\n\r\n".encode())
        try:
            await until(lambda: p.server.open == 1, what="the download open")
            t0 = time.monotonic()
            await until(lambda: p.server.open == 0, timeout=10, what="the stalled download closed")
            assert time.monotonic() - t0 < 5
            assert p.channel.tickets[name].streams == 0
            assert p.channel.stats["bytes_sent"] < 40 * MiB
        finally:
            s.close()

    run(tmp_path, body)


# ------------------------------------------------------------------ a hostile sealed server
class OneShot:
    """A TCP server on loopback that answers one connection with ``reply`` (then keeps it open ``hold``
    seconds): a working server, hostile on purpose."""

    def __init__(self, reply: bytes, hold: float = 0.0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply, self.hold = reply, hold
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        c, _ = self.sock.accept()
        with c:
            c.recv(4096)
            try:
                c.sendall(self.reply)
            except OSError:
                pass
            time.sleep(self.hold)


@pytest.mark.parametrize("reply, why", [
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 2000, "more than"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "not the"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\n\r\n", "answered"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % S.sealed_size(9 * MiB) + os.urandom(S.RECORD + S.TAG),
     "failed its tag"),
])
def test_a_hostile_sealed_server_gets_nothing_into_the_file(tmp_path, reply, why):
    srv = OneShot(reply)
    path = tmp_path / "part"
    import hashlib
    with open(path, "wb") as f:
        out = sealed_fetch.download("127.0.0.1", srv.port, "t" * 32, os.urandom(32), "ab" * 32, 9 * MiB, f,
                                    hashlib.sha256(), 0, sealed_fetch.Stop())
    assert why in out.error and out.offset == 0
    assert path.stat().st_size == 0


def test_a_silent_sealed_server_is_left_after_the_read_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(sealed_fetch, "READ_SECONDS", 0.5)
    srv = OneShot(b"", hold=5)
    import hashlib
    t0 = time.monotonic()
    with open(tmp_path / "part", "wb") as f:
        out = sealed_fetch.download("127.0.0.1", srv.port, "t" * 32, os.urandom(32), "ab" * 32, 9 * MiB, f,
                                    hashlib.sha256(), 0, sealed_fetch.Stop())
    assert out.error and time.monotonic() - t0 < 3


def test_a_flood_of_ticket_gets_is_bounded_like_blob_gets(tmp_path):
    """One connection's 200 TICKET_GETs in one step: at most BLOB_GETS_PER_STEP are answered (the rest
    dropped unread, as BLOB_GETs are), and it never holds more than TICKETS_PER_CONNECTION live tickets."""
    from farm import constants as FC
    from farm.store import sealed as FS
    from tests.fixtures_inproc import Driver, make_engine_and_store, of
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    channel = SealedChannel(blobs)
    channel.port = 5556  # as if its server listened
    coord = Coordinator(engine, blobs, Scheduler(seed=0), verify=False, sealed=channel)
    drv = Driver(coord)
    drv.hello(b"w1")
    sha = blobs.write_bytes(os.urandom(S.MIN_BYTES))
    coord.blob_requests.may_fetch = lambda s, conn, h: True  # as if a lease named it
    answered = 0
    for _ in range(5):
        out = drv.send(*[(b"w1", P.TicketGet(sha))] * 200, dt=0.1)
        answered += len(of(out, P.Ticket))
        assert len(of(out, P.Ticket)) <= FC.BLOB_GETS_PER_STEP
    assert answered == 5 * FC.BLOB_GETS_PER_STEP
    assert len(channel.tickets) == FS.TICKETS_PER_CONNECTION
    assert coord.stats["blob_gets_dropped"] == 5 * (200 - FC.BLOB_GETS_PER_STEP)
    channel.close()
