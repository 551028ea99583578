"""Bounded work per peer on the worker plane (issue 18): a connection that floods BLOB_GETs and reads
none costs the coordinator a bounded send queue (ZeroMQ's per-peer SNDHWM, ROUTER_MANDATORY), is served
nothing while its queue is full, and is dropped once it has read nothing for the liveness time — while an
honest worker on the same plane keeps its heartbeats and its downloads. A real Broker (ROUTER on a loopback
port), a real Coordinator and SQLite file, a raw DEALER as the attacker and a real WorkerDaemon."""
from __future__ import annotations

import asyncio
import os
import time

import zmq

from common import protocol as P
from farm import constants as FC
from tests.plane.test_blob_transfer import run, until


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def leech(p, sha: str):
    """A raw DEALER worker "mallory" that reads next to nothing (a one-message receive queue, a 4 KiB socket
    buffer), welcomed, with a lease naming blob ``sha``: (its socket, the lease's [task, attempt])."""
    bad = p.ctx.socket(zmq.DEALER)
    bad.setsockopt(zmq.RCVHWM, 1)
    bad.setsockopt(zmq.RCVBUF, 4096)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(p.endpoint)
    await bad.send_multipart(P.encode(P.Hello("mallory", "", 1, {"runtimes": ["blender"]}, [])))
    assert isinstance(P.decode(await asyncio.wait_for(bad.recv_multipart(), 10)), P.Welcome)  # HELLO committed
    return bad, [await asyncio.to_thread(p.lease_row, "mallory", sha), 1]


def test_a_peer_that_floods_blob_gets_and_reads_nothing_is_bounded_then_dropped(tmp_path):
    data = os.urandom(4 * 1024 * 1024)

    async def body(p):
        sha = p.blobs.write_bytes(data)
        honest = await p.daemon(worker_id="honest")
        await p.need(honest, sha)
        # the attacker: a raw DEALER that holds a lease on the same blob, then asks for it 3,000 times over
        # and never reads (its own receive queue is one message, its socket buffer small)
        bad, lease = await leech(p, sha)
        before = rss_mb()
        t0 = time.monotonic()
        await bad.send_multipart(P.encode(P.Heartbeat([lease])))
        for i in range(3000):
            await bad.send_multipart(P.encode(P.BlobGet(sha, (i % 16) * 256 * 1024, 256 * 1024)))
            if i % 100 == 0:
                await asyncio.sleep(0)

        async def keep_alive():  # it heart-beats (and asks on), so only its unread queue can give it away
            while True:
                await bad.send_multipart(P.encode(P.Heartbeat([lease])))  # it holds its lease
                await bad.send_multipart(P.encode(P.BlobGet(sha, 0, 256 * 1024)))
                await asyncio.sleep(0.3)
        beats = asyncio.create_task(keep_alive())
        # meanwhile the honest worker downloads the blob whole and stays connected
        path = await honest.fetch(sha)
        assert path.read_bytes() == data
        try:
            await until(lambda: p.coord.stats["congested_dropped"] >= 1, timeout=30,
                        what="the flooding peer dropped for reading nothing")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stats {dict(p.coord.stats)}, congested {p.coord.congested}, "
                                 f"conns {[c.worker_id for c in p.coord.conns.values()]}") from None
        beats.cancel()
        grown = rss_mb() - before
        assert not any(c.worker_id == "mallory" for c in p.coord.conns.values())
        assert any(c.worker_id == "honest" for c in p.coord.conns.values()), "the honest worker stayed"
        assert p.coord.stats["blob_gets_dropped"] > 0, "requests past its queue were not served"
        served = p.coord.stats["chunks_out"]
        assert served <= 2 * FC.PEER_SEND_QUEUE + FC.BLOB_GETS_PER_STEP + 64, \
            f"{served} chunks read for a peer that reads nothing (and the honest worker's 16)"
        assert grown < 150, f"the coordinator grew by {grown:.0f} MB for one peer that reads nothing"
        print(f"flood: {served} chunks served, {p.coord.stats['blob_gets_dropped']} requests dropped, "
              f"RSS +{grown:.0f} MB, dropped after {time.monotonic() - t0:.1f} s")
        bad.close(0)

    run(tmp_path, body, timeout=60)



def test_the_chunks_queued_for_a_peer_that_reads_nothing_are_bounded_in_bytes(tmp_path, monkeypatch):
    """PEER_SEND_BYTES: BLOB chunks (1 MiB) waiting for one peer are counted in bytes until libzmq lets go
    of them; past the bound the peer's chunks are not sent and it is congested (so it is served nothing
    and dropped after the liveness time), whatever the message count (SNDHWM) would still allow."""
    from common import limits as L
    bound = 6 * L.BLOB_CHUNK_SIZE
    monkeypatch.setattr(FC, "PEER_SEND_BYTES", bound)
    data = os.urandom(64 * L.BLOB_CHUNK_SIZE)

    async def body(p):
        sha = p.blobs.write_bytes(data)
        honest = await p.daemon(worker_id="honest")
        await p.need(honest, sha)
        bad, lease = await leech(p, sha)
        await bad.send_multipart(P.encode(P.Heartbeat([lease])))
        ident = next(i for i, c in p.coord.conns.items() if c.worker_id == "mallory")
        most = 0
        for i in range(64):
            await bad.send_multipart(P.encode(P.BlobGet(sha, i * L.BLOB_CHUNK_SIZE, L.BLOB_CHUNK_SIZE)))
            await asyncio.sleep(0.005)
            most = max(most, p.broker.queued_bytes(ident))
        await until(lambda: ident in p.coord.congested, timeout=10, what="the peer congested by its bytes")
        most = max(most, p.broker.queued_bytes(ident))
        assert 0 < most <= bound, f"{most} bytes of chunks queued for a peer that reads nothing (bound {bound})"
        path = await honest.fetch(sha)  # meanwhile an honest worker is served in full
        assert path.read_bytes() == data
        assert p.broker.queued_bytes(ident) <= bound and ident in p.coord.congested, "still congested: it read nothing"
        bad.close(0)

    run(tmp_path, body, timeout=60)

def test_a_connection_may_have_only_so_many_unfinished_uploads(tmp_path):
    """The attack: a worker holding one lease begins uploads of thousands of made-up blobs, each a partial
    file on the coordinator's disk. A connection has at most UPLOADS_PER_CONNECTION unfinished ones; the
    next is refused with the fix, and finishing one makes room."""
    import hashlib

    from tests.fixtures_inproc import Driver, make_engine_and_store, make_job, make_user, new_coordinator, of
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    alice, _ = make_user(engine, "alice")
    make_job(engine, blobs, alice, frames="1")
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"w1")
    assert of(d.send((b"w1", P.Ready(1))), P.Task, b"w1"), "it holds a lease: uploads are open to it"
    bodies = [os.urandom(2048) for _ in range(FC.UPLOADS_PER_CONNECTION + 1)]
    acks = []
    for body in bodies:
        sha = hashlib.sha256(body).hexdigest()
        acks += of(d.send((b"w1", P.BlobPut(sha, 0, len(body), body[:1024]))), P.BlobAck, b"w1")
    assert [a.error for a in acks[:-1]] == [""] * FC.UPLOADS_PER_CONNECTION
    assert acks[-1].error == (f"{FC.UPLOADS_PER_CONNECTION} uploads of this connection are unfinished, the most "
                              "one may have: finish them (or reconnect) before starting another")
    assert len(list((blobs.root / "partial").iterdir())) == FC.UPLOADS_PER_CONNECTION
    first = bodies[0]
    done = of(d.send((b"w1", P.BlobPut(hashlib.sha256(first).hexdigest(), 1024, len(first), first[1024:]))),
              P.BlobAck, b"w1")
    assert done[0].done and blobs.has(hashlib.sha256(first).hexdigest())
    last = bodies[-1]
    again = of(d.send((b"w1", P.BlobPut(hashlib.sha256(last).hexdigest(), 0, len(last), last[:1024]))),
               P.BlobAck, b"w1")
    assert again[0].error == "" and again[0].offset == 1024, "a finished upload made room for another"
