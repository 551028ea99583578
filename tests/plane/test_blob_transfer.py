"""Blob transfer on the worker plane, for real: a Broker (ROUTER on a random loopback port) with a
Coordinator, and WorkerDaemons whose connection loop ``_session()`` runs in the same asyncio loop.
No Blender is started: the daemons only fetch and upload, and TASKs are recorded instead of run."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import zmq.asyncio

from common import limits as C
from farm.plane.broker import Broker
from farm.store.models import Blob
from tests.fixtures_inproc import get, make_engine_and_store, make_job, make_user, new_coordinator, sha256
from worker.daemon import TaskFailure, WorkerDaemon

CHUNK = C.BLOB_CHUNK_SIZE


async def until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Plane:
    """A running broker + coordinator, and the daemons connected to it; everything stops on exit."""

    def __init__(self, root: Path):
        self.root = root
        self.engine, self.blobs = make_engine_and_store(root / "farm")
        self.coord = new_coordinator(self.engine, self.blobs)
        self.sessions: list[tuple[WorkerDaemon, asyncio.Task]] = []

    async def __aenter__(self):
        self.ctx = zmq.asyncio.Context()
        self.broker = Broker(self.coord, "tcp://127.0.0.1:0", ctx=self.ctx)
        self.broker_task = asyncio.create_task(self.broker.run())
        self.endpoint = await self.broker.ready()
        return self

    async def daemon(self, cache: str = "cache", worker_id: str | None = None, **kw) -> WorkerDaemon:
        """Start a daemon's connection loop (no runtimes) and wait until its HELLO is on the wire."""
        d = WorkerDaemon(self.endpoint, self.root / cache, worker_id=worker_id, **kw)
        d.ctx = self.ctx
        d.ready_info = {}
        self.sessions.append((d, asyncio.create_task(d._session())))
        await until(lambda: d.sock is not None, what="the daemon's socket")
        return d

    async def need(self, d: WorkerDaemon, *shas: str) -> None:
        """Give ``d`` a lease whose inputs are ``shas``: a worker fetches only the inputs of tasks it holds.
        (After its WELCOME: a HELLO requeues the leases it does not list.)"""
        await until(lambda: d.stats["welcomes"] > 0, what="WELCOME (sent once its HELLO is committed)")

        await asyncio.to_thread(self.lease_row, d.id, *shas)  # the broker's step may hold SQLite's write lock

    def lease_row(self, worker_id: str, *shas: str) -> int:
        """Write a task leased to ``worker_id`` whose inputs are ``shas`` (as an assignment would); its id."""
        from farm.store.db import session
        from farm.store.models import Job, Task
        with session(self.engine) as s:
            if not hasattr(self, "_owner"):
                self._owner = make_user(self.engine, "transfer-tests")[0]
            job = Job(owner_id=self._owner.id, kind="blender", spec={}, tasks_total=1)
            s.add(job)
            s.flush()
            # a kind no worker runs: requeued by a HELLO that does not list it, it is never leased again as a
            # real render (a Blender start that a test's teardown then waits on is outside what these test)
            task = Task(job_id=job.id, index=0, kind="transfer-test", spec={}, inputs=list(shas), status="assigned",
                        attempt=1, worker_id=worker_id, lease_expires=time.time() + 3600)
            s.add(task)
            s.commit()
            return task.id

    async def interrupted_fetch(self, sha: str, after: int) -> tuple[WorkerDaemon, Path]:
        """A daemon "w1" holding a lease of ``sha`` starts fetching it and is cancelled (as a CANCEL of the task
        that wanted the blob does) once ``after`` bytes are in its partial file; the daemon and that file."""
        d = await self.daemon(worker_id="w1")
        await self.need(d, sha)
        part = d.cache.partial(sha)
        fetch = asyncio.create_task(d.fetch(sha))
        await until(lambda: part.exists() and part.stat().st_size >= after, what=f"{after} bytes downloaded")
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        assert fetch.cancelled(), "the cancellation was not swallowed by a chunk arriving at the same time"
        return d, part

    async def kill(self, d: WorkerDaemon) -> None:
        """Stop a daemon abruptly, as a crash would: its tasks die, its socket closes, no BYE."""
        for daemon, task in self.sessions:
            if daemon is d:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def __aexit__(self, *exc):
        for _, task in self.sessions:
            task.cancel()
        await asyncio.gather(*(t for _, t in self.sessions), return_exceptions=True)
        self.broker.stop()
        try:
            await asyncio.wait_for(self.broker_task, 10)
        finally:
            self.ctx.destroy(linger=0)


def run(tmp_path: Path, body, timeout: float = 60.0):
    """Run ``body(plane)`` in a fresh event loop with a running farm plane. Whatever is left running at the
    end is cancelled here, with a bound: a task that ignored its cancellation fails the test with its stack
    (asyncio.run would wait for it forever, and pytest-timeout would hide the body's own error)."""
    async def main():
        try:
            async with Plane(tmp_path) as plane:
                await asyncio.wait_for(body(plane), timeout)
        finally:
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in left:
                t.cancel()
            _, pending = await asyncio.wait(left, timeout=10) if left else (set(), set())
            assert not pending, f"tasks ignored their cancellation: {[t.get_stack() for t in pending]}"
    asyncio.run(main())


def chunks_for(size: int) -> int:
    return -(-size // CHUNK)


def test_multi_chunk_fetch_lands_verified_and_is_cached(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 12345)

    async def body(p: Plane):
        sha = p.blobs.write_bytes(data)
        d = await p.daemon()
        await p.need(d, sha)
        path = await d.fetch(sha)
        assert path == d.cache.path(sha) and path.read_bytes() == data
        assert not d.cache.partial(sha).exists()
        assert d.stats["bytes_downloaded"] == len(data)
        assert p.coord.stats["chunks_out"] == chunks_for(len(data)), "each chunk requested once"
        assert await d.fetch(sha) == path
        assert d.stats["bytes_downloaded"] == len(data), "a cached blob downloads nothing"
        # two tasks wanting the same blob at once share one download
        other = p.blobs.write_bytes(data[::-1])
        await p.need(d, other)
        a, b = await asyncio.gather(d.fetch(other), d.fetch(other))
        assert a == b and a.read_bytes() == data[::-1]
        assert d.stats["bytes_downloaded"] == 2 * len(data)
        # tiny and empty blobs
        for small in (b"", b"x"):
            await p.need(d, sha256(small))
            assert (await d.fetch(p.blobs.write_bytes(small))).read_bytes() == small

    run(tmp_path, body)


def test_a_tasks_inputs_are_fetched_a_few_at_a_time(tmp_path, monkeypatch):
    """A task's many inputs (a contact sheet's images, a tiled frame's tiles) are fetched at once, but never
    more than FETCH_PARALLEL of them (each holds a credit window the coordinator queues for this peer)."""
    from worker import settings
    monkeypatch.setattr(settings, "FETCH_PARALLEL", 3)
    blobs = [os.urandom(CHUNK + i) for i in range(10)]

    async def body(p: Plane):
        shas = [p.blobs.write_bytes(b) for b in blobs]
        d = await p.daemon()
        await p.need(d, *shas)
        most, stop = 0, False

        async def watch():
            nonlocal most
            while not stop:
                most = max(most, len(d.transfers.busy))
                await asyncio.sleep(0)
        watcher = asyncio.ensure_future(watch())
        files = await d._fetch_all(shas + shas[:2])  # a repeated input is fetched once
        stop = True
        await watcher
        assert list(files) == shas, "in the task's order"
        assert [files[s].read_bytes() for s in shas] == blobs
        assert 1 < most <= 3, f"{most} fetches at once"
        assert d.stats["bytes_downloaded"] == sum(map(len, blobs))

    run(tmp_path, body)


def test_unknown_blob_fails_the_fetch(tmp_path):
    async def body(p: Plane):
        d = await p.daemon()
        await p.need(d, sha256(b"not on the coordinator"))  # named by its task, but never uploaded
        with pytest.raises(TaskFailure) as exc:
            await d.fetch(sha256(b"not on the coordinator"))
        assert exc.value.retryable and "unknown blob" in str(exc.value)
        assert not d.cache.has(sha256(b"not on the coordinator"))

    run(tmp_path, body)


def test_interrupted_download_resumes_in_a_new_daemon(tmp_path):
    data = os.urandom(3 * 1024 * 1024)

    async def body(p: Plane):
        sha = p.blobs.write_bytes(data)
        d1, part = await p.interrupted_fetch(sha, 1024 * 1024)
        await p.kill(d1)
        have = part.stat().st_size
        assert CHUNK <= have < len(data) and have % CHUNK == 0
        assert not d1.cache.has(sha)

        d2 = await p.daemon(worker_id="w1")  # a restarted worker: same cache dir, same id
        await p.need(d2, sha)  # its HELLO requeued the lease it did not list: it gets a new one
        path = await d2.fetch(sha)
        assert path.read_bytes() == data and not part.exists()
        assert d2.stats["bytes_downloaded"] == len(data) - have, "resumed from the partial file"
        served = p.coord.stats["chunks_out"] * CHUNK
        assert served <= chunks_for(len(data)) * CHUNK + C.BLOB_CREDIT * CHUNK, \
            "at most the requests in flight at the interruption were served twice"

    run(tmp_path, body)


def test_corrupted_partial_fails_the_hash_check_then_refetches(tmp_path):
    data = os.urandom(4 * CHUNK + 777)

    async def body(p: Plane):
        sha = p.blobs.write_bytes(data)
        d = await p.daemon()
        await p.need(d, sha)
        part = d.cache.partial(sha)
        bad = bytearray(data[:2 * CHUNK])
        bad[1000] ^= 0xFF
        part.write_bytes(bytes(bad))
        with pytest.raises(TaskFailure) as exc:
            await d.fetch(sha)
        assert "hash check" in str(exc.value) and exc.value.retryable
        assert d.stats["bytes_downloaded"] == len(data) - 2 * CHUNK, "it resumed after the corrupt bytes"
        assert not part.exists() and not d.cache.has(sha), "the corrupt download is thrown away"
        path = await d.fetch(sha)
        assert path.read_bytes() == data
        assert d.stats["bytes_downloaded"] == 2 * len(data) - 2 * CHUNK

        # a partial file longer than the blob cannot be right either
        other = p.blobs.write_bytes(b"short blob")
        await p.need(d, other)
        d.cache.partial(other).write_bytes(b"short blob, with trailing junk")
        with pytest.raises(TaskFailure):
            await d.fetch(other)
        assert (await d.fetch(other)).read_bytes() == b"short blob"

    run(tmp_path, body)


def test_upload_while_holding_a_lease(tmp_path):
    out = os.urandom(3 * CHUNK + 100)

    async def body(p: Plane):
        user, _ = make_user(p.engine, "alice")
        job_id = make_job(p.engine, p.blobs, user, "1")  # one task: only the first daemon gets a lease
        leases = []
        d = await p.daemon(worker_id="w1")
        d._start_task = leases.append  # record the TASK instead of rendering it
        await until(lambda: leases, what="a TASK for w1 (sent after WELCOME and READY)")
        assert (leases[0].job_id, leases[0].attempt) == (job_id, 1)
        idle = await p.daemon(cache="idle", worker_id="idle")
        idle._start_task = leases.append
        src = p.root / "frame_0001.png"
        src.write_bytes(out)
        sha = sha256(out)

        with pytest.raises(TaskFailure) as exc:
            await idle.upload(src, sha)
        assert "task lease" in str(exc.value)
        assert not p.blobs.has(sha) and len(leases) == 1

        await d.upload(src, sha)
        assert p.blobs.read(sha, 0, len(out) + 1) == out
        row = get(p.engine, Blob, sha)
        assert (row.size, row.origin) == (len(out), "worker")
        assert d.stats["bytes_uploaded"] == len(out)
        await d.upload(src, sha)
        assert d.stats["bytes_uploaded"] == len(out), "stored already: nothing is sent again"

        # an upload interrupted earlier resumes from the bytes the coordinator stored
        second = p.root / "frame_0002.png"
        second.write_bytes(out[::-1])
        sha2 = sha256(out[::-1])
        p.blobs.put_chunk(sha2, 0, len(out), out[::-1][:2 * CHUNK])
        await d.upload(second, sha2)
        assert p.blobs.read(sha2, 0, len(out) + 1) == out[::-1]
        assert d.stats["bytes_uploaded"] == 2 * len(out) - 2 * CHUNK

    run(tmp_path, body)


def test_two_uploads_of_the_same_bytes_at_once_both_finish(tmp_path):
    """Two tasks of one worker can make identical outputs (two probe renders of one scene): their uploads,
    at once, must both end — they once shared one answer queue, and the first waited forever."""
    out = os.urandom(3 * CHUNK + 7)

    async def body(p: Plane):
        user, _ = make_user(p.engine, "alice")
        make_job(p.engine, p.blobs, user, "1")
        leases = []
        d = await p.daemon(worker_id="w1")
        d._start_task = leases.append
        await until(lambda: leases, what="a TASK for w1")
        a, b = p.root / "a.png", p.root / "b.png"
        a.write_bytes(out)
        b.write_bytes(out)
        sha = sha256(out)
        await asyncio.wait_for(asyncio.gather(d.upload(a, sha), d.upload(b, sha)), 15)
        assert p.blobs.read(sha, 0, len(out) + 1) == out
        assert d.stats["bytes_uploaded"] == len(out), "the second found the bytes stored: nothing sent twice"
        assert not d.transfers.busy, "no transfer left registered"

    run(tmp_path, body)


def test_lru_cap_evicts_least_recently_used_but_never_pinned(tmp_path):
    size = 100_000
    blobs_data = {name: os.urandom(size) for name in "ABCD"}

    async def body(p: Plane):
        sha = {name: p.blobs.write_bytes(b) for name, b in blobs_data.items()}
        d = await p.daemon(cache_bytes=int(2.5 * size))
        await p.need(d, *sha.values())
        cache = d.cache

        def age(name: str, seconds_ago: float):
            t = time.time() - seconds_ago
            os.utime(cache.path(sha[name]), (t, t))

        def held() -> set[str]:
            return {n for n, h in sha.items() if cache.path(h).exists()}

        await d.fetch(sha["A"])
        await d.fetch(sha["B"])
        age("A", 100)
        age("B", 50)
        assert cache.has(sha["A"])  # A is used again: B is now the least recently used
        await d.fetch(sha["C"])
        assert held() == {"A", "C"}

        cache.pin(sha["A"])
        age("A", 200)
        age("C", 100)
        await d.fetch(sha["D"])
        assert held() == {"A", "D"}, "the pinned blob stays although it is the oldest"
        assert cache.evict() == [], "under the cap nothing more goes"

        cache.unpin(sha["A"])
        age("A", 200)
        await d.fetch(sha["B"])
        assert held() == {"D", "B"}
        assert sum(cache.path(sha[n]).stat().st_size for n in held()) <= cache.cap
        assert all(cache.path(sha[n]).read_bytes() == blobs_data[n] for n in held())

    run(tmp_path, body)


def test_a_worker_cannot_fetch_blobs_it_holds_no_lease_for(tmp_path):
    """The attack: a creator connects a worker of their own and asks for a rendered frame (or another
    creator's scene) by hash. Blobs go by need: only inputs of a lease the connection holds."""
    frame = os.urandom(2 * CHUNK + 5)

    async def body(p: Plane):
        user, _ = make_user(p.engine, "alice")
        make_job(p.engine, p.blobs, user, "1")          # its scene is leased to w1 below, not to the thief
        leases = []
        honest = await p.daemon(worker_id="w1")
        honest._start_task = leases.append
        await until(lambda: leases, what="a TASK for w1")
        scene = leases[0].inputs[0]
        stolen = p.blobs.write_bytes(frame)              # another job's full-resolution output
        thief = await p.daemon(cache="thief", worker_id="thief")
        thief._start_task = leases.append
        for sha in (stolen, scene):
            with pytest.raises(TaskFailure) as exc:
                await thief.fetch(sha)
            assert "not an input of a task you hold" in str(exc.value)
            part = thief.cache.partial(sha)
            assert not thief.cache.has(sha) and (not part.exists() or part.stat().st_size == 0)
        assert thief.stats["bytes_downloaded"] == 0 and p.coord.stats["blob_refused"] >= 2
        assert (await honest.fetch(scene)).read_bytes() == p.blobs.read(scene, 0, 1 << 20)  # its own input

    run(tmp_path, body)


def test_a_worker_fetches_with_the_chunk_and_credit_its_coordinator_serves(tmp_path, monkeypatch):
    """WELCOME's chunk_size and credit are what the worker asks with (so an older coordinator of 256 KiB
    chunks serves a newer worker); a coordinator serving less than was asked is read on from where its
    chunk ended, not left with a gap."""
    data = os.urandom(3 * CHUNK + 12345)

    async def body(p: Plane):
        sha = p.blobs.write_bytes(data)
        d = await p.daemon()
        await p.need(d, sha)
        assert (d.transfers.chunk_size, d.transfers.credit) == (C.BLOB_CHUNK_SIZE, C.BLOB_CREDIT)
        d.transfers.welcome(64 * 1024, 1000)  # a coordinator of small chunks: the window stays bounded
        assert d.transfers.chunk_size == 64 * 1024 and d.transfers.credit * 64 * 1024 <= 64 * 1024**2
        d.transfers.welcome(C.BLOB_CHUNK_SIZE, C.BLOB_CREDIT)
        monkeypatch.setattr(C, "BLOB_CHUNK_SIZE", 100_000)  # the coordinator now serves 100 kB of each 1 MiB asked
        path = await d.fetch(sha)
        assert path.read_bytes() == data
        assert d.stats["bytes_downloaded"] == len(data), "every byte fetched once"

    run(tmp_path, body)
