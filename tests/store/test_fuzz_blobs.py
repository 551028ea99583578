"""Fuzzing blob transfer: the BlobStore directly (a hypothesis state machine) and BLOB_PUT / BLOB_GET
through ``Coordinator.step`` from a worker that holds a lease.

Whatever the chunks (random offsets, lengths and declared totals, negative or beyond the size limit,
bytes that do not hash to the announced sha256, truncated or out-of-order uploads, malformed names):
nothing but BlobError escapes the store and nothing escapes ``step``; a stored blob always hashes to its
name; partial files stay within their declared size and their number within ``max_partials``; temporary
files never stay behind; and an honest uploader that follows the protocol (probe, resume from the acked
offset, start over after an error) still gets its blob stored afterwards.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from common import limits as C
from common import protocol as P
from farm.store.blobs import BlobError, BlobStore
from farm.store.db import session as new_session
from farm.store.models import Blob, Task
from tests.fixtures_inproc import Driver, get, make_engine_and_store, make_job, make_user, new_coordinator, of, rows

LIMIT = 4096  # a small size limit, so that "over the limit" is cheap to reach
_RNG = random.Random(0)  # the same contents every run, as the examples are (derandomized)
CONTENTS = [b"", b"x", _RNG.randbytes(100), _RNG.randbytes(LIMIT), _RNG.randbytes(LIMIT + 1), bytes(3000)]
HASHES = [hashlib.sha256(c).hexdigest() for c in CONTENTS]
BAD_NAMES = ["", "../../etc/passwd", "../" + HASHES[2][3:], "A" * 64, HASHES[2][:63], HASHES[2] + "0",
             HASHES[2][:62] + "/x", "\x00" * 64, "a" * 64 + "\n", "ab/" + "c" * 61]
GRANTED = HASHES + [n for n in BAD_NAMES if "\x00" not in n]
"""The names the leased task's inputs list (a worker may fetch only those): the store's own checks of
them are what these tests are about."""
SHAS = st.sampled_from(HASHES) | st.sampled_from(BAD_NAMES) | st.text("0123456789abcdef", min_size=64, max_size=64)
SIZES = st.sampled_from([0, 1, 100, LIMIT, LIMIT + 1, -1, -(2**63), 2**63 - 1]) | st.integers(-10, 2 * LIMIT)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def content_of(sha: str) -> bytes | None:
    return CONTENTS[HASHES.index(sha)] if sha in HASHES else None


def check_store(store: BlobStore) -> None:
    """The invariants of a blob store's directory, whatever was sent to it."""
    for d in store.root.iterdir():
        if d.name in ("partial", "tmp"):
            continue
        for f in d.iterdir():
            assert f.name.startswith(d.name) and hashlib.sha256(f.read_bytes()).hexdigest() == f.name, \
                f"stored blob {f.name} does not hash to its name"
    parts = list((store.root / "partial").iterdir())
    assert len(parts) <= store.max_partials
    for f in parts:
        assert f.stat().st_size <= store.max_bytes and f.stat().st_size > 0, (f.name, f.stat().st_size)
    assert list((store.root / "tmp").iterdir()) == [], "a temporary file stayed behind"
    for p in store.root.iterdir():
        assert p.name in ("partial", "tmp") or (len(p.name) == 2 and p.is_dir()), f"unexpected {p}"
    assert {p.name for p in store.root.parent.iterdir()} <= {"blobs", "farm.db", "farm.db-wal", "farm.db-shm"}, \
        "something was written next to the store"


# ------------------------------------------------------------------ the store on its own
class StoreMachine(RuleBasedStateMachine):
    """Random put_chunk / write_stream / write_bytes / read calls against one store."""

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="fuzzblobs"))
        self.store = BlobStore(self.dir / "blobs", max_bytes=LIMIT, max_partials=4)

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except BlobError as exc:
            assert str(exc), "a BlobError says why"
            return exc

    @rule(sha=SHAS, offset=SIZES, total=SIZES, start=st.integers(0, LIMIT + 1), length=st.integers(0, 600),
          honest=st.booleans(), junk=st.binary(max_size=64))
    def put_chunk(self, sha, offset, total, start, length, honest, junk):
        content = content_of(sha)
        data = content[start:start + length] if honest and content is not None else junk
        before = self.store.has(sha) if sha in HASHES else False
        got = self._call(self.store.put_chunk, sha, offset, total, data)
        if isinstance(got, tuple):
            stored, done, taken = got
            assert done == self.store.has(sha)
            if done:
                assert stored == len(content), "done reports the stored size, not the declared one"
            elif taken:
                assert stored == self.store.partial_offset(sha) <= total
            if before:
                assert done

    @rule(i=st.integers(0, len(CONTENTS) - 1), split=st.lists(st.integers(0, LIMIT + 1), max_size=4),
          corrupt=st.booleans(), sha=SHAS)
    def write_stream(self, i, split, corrupt, sha):
        content = CONTENTS[i]
        cuts = sorted({0, len(content), *[min(s, len(content)) for s in split]})
        chunks = [content[a:b] for a, b in zip(cuts, cuts[1:])]
        if corrupt and chunks:
            chunks[-1] = chunks[-1][:-1] + b"?"
        target = HASHES[i] if not corrupt else sha
        got = self._call(self.store.write_stream, target, iter(chunks))
        ok = (not corrupt or hashlib.sha256(b"".join(chunks)).hexdigest() == target) and len(content) <= LIMIT
        assert (not isinstance(got, BlobError)) == ok, (got, ok)

    @rule(i=st.integers(0, len(CONTENTS) - 1))
    def write_bytes(self, i):
        got = self._call(self.store.write_bytes, CONTENTS[i])
        assert (got == HASHES[i]) == (len(CONTENTS[i]) <= LIMIT)

    @rule(sha=SHAS, offset=SIZES, length=SIZES)
    def read(self, sha, offset, length):
        if sha not in HASHES or not self.store.has(sha):
            with pytest.raises((BlobError, FileNotFoundError)):
                self.store.read(sha, offset, length)
            return
        got = self._call(self.store.read, sha, offset, length)
        if offset < 0 or length < 0:
            assert isinstance(got, BlobError)
        else:
            assert got == content_of(sha)[offset:offset + length]

    @rule(sha=SHAS)
    def queries(self, sha):
        for fn in (self.store.has, self.store.partial_offset):
            got = self._call(fn, sha)
            assert isinstance(got, BlobError) == (sha not in HASHES and not _valid(sha))

    @invariant()
    def store_is_sound(self):
        check_store(self.store)


def _valid(sha: str) -> bool:
    return len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=120, stateful_step_count=25, deadline=None, derandomize=True)


def test_idle_partials_are_pruned_and_their_number_is_bounded(tmp_path):
    store = BlobStore(tmp_path / "blobs", max_bytes=LIMIT, max_partials=3, partial_idle=60)
    shas = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(5)]
    for sha in shas[:3]:
        assert store.put_chunk(sha, 0, 10, b"12345") == (5, False, True)
    with pytest.raises(BlobError, match="in progress"):
        store.put_chunk(shas[3], 0, 10, b"12345")
    assert store.put_chunk(shas[3], 0, 10, b"") == (0, False, True), "a probe creates nothing, is not refused"
    assert store.put_chunk(shas[0], 5, 10, b"6789") == (9, False, True), "uploads in progress go on"
    old = os.path.getmtime(store.root / "partial" / shas[1]) - 120
    os.utime(store.root / "partial" / shas[1], (old, old))
    assert store.put_chunk(shas[3], 0, 10, b"12345") == (5, False, True), "an idle upload made room"
    assert store.partial_offset(shas[1]) == 0, "the idle upload was abandoned"
    assert len(list((store.root / "partial").iterdir())) == 3


def test_already_stored_blob_reports_its_real_size(tmp_path):
    store = BlobStore(tmp_path / "blobs", max_bytes=LIMIT)
    sha = store.write_bytes(b"hello")
    assert store.put_chunk(sha, 0, 2**63 - 1, b"") == (5, True, True)
    assert store.put_chunk(sha, 0, -5, b"zzz") == (5, True, True)
    assert store.read(sha, 0, 100) == b"hello"


# ------------------------------------------------------------------ through Coordinator.step
@pytest.fixture
def plane(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm", max_bytes=LIMIT)
    blobs.max_partials = 8
    user, _ = make_user(engine, "alice")
    make_job(engine, blobs, user, "1")
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"w1")
    d.hello(b"idle")
    [task] = of(d.send((b"w1", P.Ready(1))), P.Task)  # w1 holds a lease: it may upload
    with new_session(engine) as s:  # and its task names every blob here, so it may fetch them (by need)
        row = s.get(Task, task.task_id)
        row.inputs = [*row.inputs, *GRANTED]
        s.add(row)
        s.commit()
    return engine, blobs, d


def honest_upload(d: Driver, sha: str, data: bytes, chunk: int = 700, attempts: int = 3) -> P.BlobAck:
    """Upload as a worker does: probe, send from the acked offset, start over after an error."""
    ack = None
    for _ in range(attempts):
        [(_, ack)] = d.send((b"w1", P.BlobPut(sha, 0, len(data), b"")))
        off = ack.offset
        while not ack.done and not ack.error:
            [(_, ack)] = d.send((b"w1", P.BlobPut(sha, off, len(data), data[off:off + chunk])))
            off = ack.offset
        if ack.done:
            return ack
    return ack


def blob_puts(data_for):
    return st.builds(
        lambda sha, off, total, start, length, honest, junk: P.BlobPut(
            sha, off, total, data_for(sha)[start:start + length] if honest and data_for(sha) is not None else junk),
        SHAS, SIZES, SIZES, st.integers(0, LIMIT + 1), st.integers(0, 900), st.booleans(), st.binary(max_size=64))


def blob_gets():
    return st.builds(P.BlobGet, SHAS, SIZES | st.integers(-(2**63), 2**63 - 1), SIZES | st.integers(2**20, 2**63 - 1))


@FUZZ
@given(st.lists(st.lists(blob_puts(content_of) | blob_gets(), min_size=1, max_size=12), min_size=1, max_size=6))
def test_random_blob_traffic_through_step(plane, batches):
    engine, blobs, d = plane
    for batch in batches:
        out = d.send(*[(b"w1", m) for m in batch])
        nul = [m for m in batch if "\x00" in m.sha256]  # refused by the protocol (ERROR), never handled
        assert [m for _, m in out if isinstance(m, P.Error)] == [P.Error(
            f"malformed message: {type(m).__name__}.sha256: a string may not contain NUL characters") for m in nul]
        puts = [m for m in batch if isinstance(m, P.BlobPut) and m not in nul]
        gets = [m for m in batch if isinstance(m, P.BlobGet) and m not in nul]
        acks, chunks = of(out, P.BlobAck), of(out, P.Blob)
        assert len(acks) <= len(puts) and len(chunks) == len(gets), "at most one answer a message"
        for m, blob in zip(gets, chunks):
            content = content_of(m.sha256)
            if m.sha256 not in GRANTED:
                assert "not an input of a task you hold" in blob.error and blob.data == b""
            elif content is None or not blobs.has(m.sha256):
                assert blob.error == "unknown blob" and blob.data == b""
            else:
                off, n = max(0, m.offset), max(0, min(m.length, C.BLOB_CHUNK_SIZE))
                assert (blob.total, blob.data) == (len(content), content[off:off + n])
        for ack in acks:
            assert ack.done == (ack.sha256 in HASHES and blobs.has(ack.sha256))
            assert ack.error or 0 <= ack.offset <= LIMIT
        check_store(blobs)
    for row in rows(engine, Blob):
        assert blobs.has(row.sha256), "a Blob row for bytes never stored"
    # an hour later an honest worker still gets each storable blob in, whatever the partial files hold
    blobs.partial_idle = 0.0
    for sha, content in zip(HASHES, CONTENTS):
        ack = honest_upload(d, sha, content)
        if len(content) <= LIMIT:
            assert ack.done and blobs.read(sha, 0, LIMIT + 1) == content, ack
            assert get(engine, Blob, sha) is not None
        else:
            assert not ack.done and "limit" in ack.error and not blobs.has(sha)
    check_store(blobs)


def test_wrong_bytes_never_become_a_blob_and_the_upload_starts_over(plane):
    engine, blobs, d = plane
    sha, content = HASHES[3], CONTENTS[3]
    evil = bytearray(content)
    evil[2000] ^= 1
    ack = honest_upload(d, sha, bytes(evil), attempts=1)
    assert ack.error and "do not hash" in ack.error and not blobs.has(sha)
    assert blobs.partial_offset(sha) == 0 and get(engine, Blob, sha) is None, "the bad bytes were discarded"
    assert honest_upload(d, sha, content).done and blobs.read(sha, 0, LIMIT) == content


def test_truncated_and_out_of_order_uploads_resume_from_the_stored_bytes(plane):
    engine, blobs, d = plane
    sha, content = HASHES[5], CONTENTS[5]
    rng = random.Random(5)
    d.send((b"w1", P.BlobPut(sha, 0, len(content), content[:1000])))  # then the worker vanished
    offsets = list(range(0, len(content), 250))
    rng.shuffle(offsets)
    out = d.send(*[(b"w1", P.BlobPut(sha, o, len(content), content[o:o + 250])) for o in offsets])
    have, want = 1000, []
    for o in offsets:  # only a chunk at the stored size is taken (and acked)
        if o == have:
            have += 250
            want.append(have)
    assert [a.offset for a in of(out, P.BlobAck)] == want and 1000 < have < len(content)
    assert blobs.partial_offset(sha) == have and not blobs.has(sha)
    # a chunk running past the declared total, and one declaring a smaller total, are not taken
    assert d.send((b"w1", P.BlobPut(sha, have, have + 100, content[have:have + 200]))) == []
    assert blobs.partial_offset(sha) == have
    assert honest_upload(d, sha, content).done and blobs.read(sha, 0, 4000) == content


def test_leftover_partials_never_stall_an_upload(plane):
    """A worker resumes from the offset the probe acks; a partial at or past the declared size used to be
    acked as is, so the worker had nothing left to send and waited for an ack forever."""
    engine, blobs, d = plane
    sha, content = HASHES[2], CONTENTS[2]
    (blobs.root / "partial" / sha).write_bytes(content)  # the coordinator stopped before verifying
    assert d.send((b"w1", P.BlobPut(sha, 0, len(content), b""))) == [(b"w1", P.BlobAck(sha, len(content), True))]
    assert blobs.read(sha, 0, 1000) == content and get(engine, Blob, sha).size == len(content)
    sha, content = HASHES[3], CONTENTS[3]
    for junk in (bytes(len(content)), content + b"more"):  # wrong bytes; begun under a larger total
        (blobs.root / "partial" / sha).write_bytes(junk)
        assert d.send((b"w1", P.BlobPut(sha, 0, len(content), b""))) == [(b"w1", P.BlobAck(sha, 0, False))]
        assert blobs.partial_offset(sha) == 0
    assert honest_upload(d, sha, content, attempts=1).done


def test_sizes_over_the_limit_and_malformed_names_are_refused_before_writing(plane):
    engine, blobs, d = plane
    for total in (LIMIT + 1, 2**63 - 1, -1, -(2**63)):
        [(_, ack)] = d.send((b"w1", P.BlobPut(HASHES[2], 0, total, CONTENTS[2])))
        assert not ack.done and "limit" in ack.error, ack
    for name in BAD_NAMES:
        [(_, ack)] = d.send((b"w1", P.BlobPut(name, 0, 1, b"x")))
        [(_, blob)] = d.send((b"w1", P.BlobGet(name, 0, 10)))
        if "\x00" in name:
            assert isinstance(ack, P.Error) and isinstance(blob, P.Error) and "NUL" in ack.reason
            continue
        assert "sha256" in ack.error and not ack.done
        assert blob.error == "unknown blob"
    assert list((blobs.root / "partial").iterdir()) == []
    assert not (blobs.root.parent / "etc").exists() and not (Path("/etc/passwd.partial")).exists()
    check_store(blobs)


def test_uploads_need_a_lease_and_probes_create_nothing(plane):
    engine, blobs, d = plane
    [(_, ack)] = d.send((b"idle", P.BlobPut(HASHES[2], 0, 100, CONTENTS[2])))
    assert ack.error == "uploads need a task lease" and not blobs.has(HASHES[2])
    for i in range(50):
        sha = hashlib.sha256(b"probe %d" % i).hexdigest()
        assert d.send((b"w1", P.BlobPut(sha, 0, 100, b""))) == [(b"w1", P.BlobAck(sha, 0, False))]
    assert list((blobs.root / "partial").iterdir()) == [], "a probe leaves no file behind"


def test_many_abandoned_uploads_are_bounded(plane):
    engine, blobs, d = plane
    refused = 0
    for i in range(3 * blobs.max_partials):
        sha = hashlib.sha256(b"abandoned %d" % i).hexdigest()
        [(_, ack)] = d.send((b"w1", P.BlobPut(sha, 0, LIMIT, os.urandom(LIMIT - 1))))
        refused += bool(ack.error)
        assert not ack.error or "in progress" in ack.error
    assert refused == 2 * blobs.max_partials
    assert len(list((blobs.root / "partial").iterdir())) == blobs.max_partials
    check_store(blobs)
    blobs.partial_idle = 0.0  # an hour later: the abandoned uploads make room for a new one
    assert honest_upload(d, HASHES[3], CONTENTS[3]).done
    assert list((blobs.root / "partial").iterdir()) == []


def test_a_declared_total_never_becomes_the_recorded_size(plane):
    engine, blobs, d = plane
    sha = blobs.write_bytes(b"on disk, no row yet")  # e.g. the API stored it and died before its commit
    [(_, ack)] = d.send((b"w1", P.BlobPut(sha, 0, 2**62, b"")))
    assert ack.done and ack.offset == len(b"on disk, no row yet")
    assert get(engine, Blob, sha).size == len(b"on disk, no row yet")
