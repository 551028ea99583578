"""One scene to several workers at once (issue 22 part 5), for real: a Broker on a loopback port with a
Coordinator and SQLite file, and real WorkerDaemon connection loops (see tests/plane/test_blob_transfer.py).

What must hold: every worker gets the exact bytes; the coordinator reads each chunk from its file once for
all of them (the blob store's chunk cache, bounded whatever is asked); an interrupted fetch resumes from
the bytes it has while the others go on; two workers sharing one cache folder neither corrupt it nor
fetch the same blob twice. Speed is bench/fanout.py's business, not these tests'."""
from __future__ import annotations

import asyncio
import os

from common import limits as C
from farm.store.blobs import BlobStore
from tests.plane.test_blob_transfer import chunks_for, run, until

CHUNK = C.BLOB_CHUNK_SIZE


def test_four_workers_fetch_one_blob_at_once_and_each_chunk_is_read_once(tmp_path):
    data = os.urandom(5 * CHUNK + 4321)  # multi-chunk, the last one short

    async def body(p):
        sha = p.blobs.write_bytes(data)
        cache = p.blobs.read_cache
        misses = cache.misses
        ds = [await p.daemon(cache=f"c{i}", worker_id=f"w{i}") for i in range(4)]
        for d in ds:
            await p.need(d, sha)
        paths = await asyncio.gather(*(d.fetch(sha) for d in ds))
        for d, path in zip(ds, paths):
            assert path.read_bytes() == data, f"{d.id} got other bytes"
            assert d.stats["bytes_downloaded"] == len(data)
        assert p.coord.stats["chunks_out"] == 4 * chunks_for(len(data))
        assert cache.misses - misses == chunks_for(len(data)), "each chunk read from the file once for all four"
        assert cache.size <= cache.cap

    run(tmp_path, body)


def test_an_interrupted_fetch_resumes_while_the_others_finish(tmp_path):
    data = os.urandom(12 * CHUNK + 99)

    async def body(p):
        sha = p.blobs.write_bytes(data)
        ds = [await p.daemon(cache=f"c{i}", worker_id=f"w{i}") for i in range(4)]
        for d in ds:
            await p.need(d, sha)
        victim = ds[0]
        part = victim.cache.partial(sha)
        fetches = [asyncio.create_task(d.fetch(sha)) for d in ds]
        await until(lambda: part.exists() and part.stat().st_size >= 2 * CHUNK, what="2 chunks downloaded")
        fetches[0].cancel()  # as a CANCEL of the task that wanted it: the partial file stays
        await asyncio.gather(fetches[0], return_exceptions=True)
        have = part.stat().st_size
        assert 2 * CHUNK <= have < len(data) and have % CHUNK == 0 and not victim.cache.has(sha)
        for path in await asyncio.gather(*fetches[1:]):
            assert path.read_bytes() == data
        path = await victim.fetch(sha)  # again, on the same connection: from the bytes it has
        assert path.read_bytes() == data and not part.exists()
        assert victim.stats["bytes_downloaded"] <= len(data) + C.BLOB_CREDIT * CHUNK, \
            "resumed: at most the chunks in flight at the interruption came twice"

    run(tmp_path, body)


def test_two_workers_sharing_a_cache_folder_fetch_a_blob_once_and_never_corrupt_it(tmp_path):
    data = os.urandom(6 * CHUNK + 1)
    other = os.urandom(3 * CHUNK)

    async def body(p):
        sha, sha2 = p.blobs.write_bytes(data), p.blobs.write_bytes(other)
        a = await p.daemon(cache="shared", worker_id="a")
        b = await p.daemon(cache="shared", worker_id="b")  # same folder, as two slots' daemons of one host
        for d in (a, b):
            await p.need(d, sha, sha2)
        pa, pb = await asyncio.gather(a.fetch(sha), b.fetch(sha))
        assert pa == pb and pa.read_bytes() == data
        assert a.stats["bytes_downloaded"] + b.stats["bytes_downloaded"] == len(data), \
            "one of them fetched it, the other waited for it and found it in the shared cache"
        assert not a.cache.partial(sha).exists()
        # one stops halfway (its claim ends with its fetch): the other resumes from its bytes
        part = a.cache.partial(sha2)
        first = asyncio.create_task(a.fetch(sha2))
        await until(lambda: part.exists() and part.stat().st_size >= CHUNK, what="a chunk downloaded")
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        have = part.stat().st_size
        assert (await b.fetch(sha2)).read_bytes() == other
        assert b.stats["bytes_downloaded"] == len(other) - have
        assert sorted(x.name for x in a.cache.root.iterdir() if x.is_file()) == sorted([sha, sha2])

    run(tmp_path, body)


def test_claims_on_one_partial_file_exclude_each_other(tmp_path):
    """The lock itself, across processes as flock is: a second open file description is refused while
    the first holds the claim, and the bytes appended by the holder are what the next claim resumes from."""
    from worker.blobcache import BlobCache
    a, b = BlobCache(tmp_path, 1 << 30), BlobCache(tmp_path, 1 << 30)  # two workers' views of one folder
    sha = "ab" * 32
    fa = a.claim(sha)
    assert fa is not None and b.claim(sha) is None
    fa.write(b"x" * 100)
    fa.close()  # the holder stops: the claim ends with its file
    fb = b.claim(sha)
    assert fb is not None and os.fstat(fb.fileno()).st_size == 100
    b.release(fb, sha)
    assert a.partial(sha).stat().st_size == 100, "release keeps a partial download's bytes"


def test_the_read_cache_stays_within_its_bound_whatever_is_asked(tmp_path):
    store = BlobStore(tmp_path / "blobs", read_cache_bytes=4 * CHUNK)
    data = os.urandom(64 * CHUNK)
    sha = store.write_bytes(data)
    for i in range(64):  # a peer walking a big blob chunk by chunk, then odd offsets and lengths
        assert store.read(sha, i * CHUNK, CHUNK) == data[i * CHUNK:(i + 1) * CHUNK]
        assert store.read_cache.size <= 4 * CHUNK
    for off in range(0, 64 * CHUNK, 77_777):
        assert store.read(sha, off, 1000) == data[off:off + 1000]
    assert store.read_cache.size <= 4 * CHUNK
    hits = store.read_cache.hits
    assert store.read(sha, 63 * CHUNK, CHUNK) is store.read(sha, 63 * CHUNK, CHUNK), "the same bytes object"
    assert store.read_cache.hits == hits + 2
    assert store.read(sha, 0, len(data) + 1) == data, "a whole-blob read bypasses the cache"
    assert store.read_cache.size <= 4 * CHUNK


def test_granted_gets_of_cached_chunks_are_served_before_the_step_within_the_same_bounds(tmp_path):
    """serve_cached (the broker's loop, no database): a chunk in the read cache goes to a connection whose
    grant is known; anything else is left for the step, and so is every later GET of a connection that had
    one left (its chunks leave in the order asked); BLOB_GETS_PER_STEP and congestion hold as in the step."""
    from common import protocol as P
    from farm import constants as FC
    data = os.urandom(8 * CHUNK)

    async def body(p):
        sha = p.blobs.write_bytes(data)
        a, b = await p.daemon(cache="a", worker_id="a"), await p.daemon(cache="b", worker_id="b")
        await p.need(a, sha)
        await until(lambda: b.stats["welcomes"] > 0, what="b welcomed")
        await a.fetch(sha)  # a's grant is known, every chunk is in the read cache
        ida = next(i for i, c in p.coord.conns.items() if c.worker_id == "a")
        idb = next(i for i, c in p.coord.conns.items() if c.worker_id == "b")
        req = p.coord.blob_requests

        def get(ident, offset, length=CHUNK):
            return [ident, *P.encode(P.BlobGet(sha, offset, length))]
        out: list = []
        batch = [get(ida, 0), get(idb, 0), get(ida, CHUNK, 1000), get(ida, 2 * CHUNK), [ida, *P.encode(P.Ready(1))]]
        rest = req.serve_cached(p.coord.conns, batch, p.coord.clock(), out)
        assert [(i, m.offset, m.data) for i, m in out] == [(ida, 0, data[:CHUNK])], "only a's cached chunk"
        assert rest == batch[1:], "b holds no grant; a's 1000-byte chunk is not cached, and its next GET follows it"
        out.clear()
        many = [get(ida, (k % 8) * CHUNK) for k in range(FC.BLOB_GETS_PER_STEP + 5)]
        assert req.serve_cached(p.coord.conns, many, p.coord.clock(), out) == []
        assert len(out) == FC.BLOB_GETS_PER_STEP, "the step's credit a connection, not more"
        req.new_step()
        assert req.gets[ida] == FC.BLOB_GETS_PER_STEP + 5, "the step that follows counts on from them"
        out.clear()
        p.coord.congested[ida] = p.coord.clock()
        try:
            assert req.serve_cached(p.coord.conns, [get(ida, 0)], p.coord.clock(), out) == [] and not out
        finally:
            p.coord.congested.pop(ida, None)

    run(tmp_path, body)
