"""Content-addressed blob store on the coordinator's disk.

A blob lives at ``ROOT/ab/abcdef…`` named by its sha256; it is written to a temporary file first, verified
by hash, then renamed into place (atomic), so a reader never sees a partial blob. Partial uploads from
workers (chunked over ZeroMQ) live under ``ROOT/partial/`` until complete, so an upload resumes after a
reconnect from the bytes already stored. Partial files are bounded: each by its declared size (at most
``max_bytes``), their number by ``max_partials``; one left idle for ``partial_idle`` seconds is deleted
when another upload starts. A probe (an empty chunk) never creates one.

Reads of at most a chunk go through a small LRU of recently read chunks (``READ_CACHE_BYTES`` in all):
several workers fetching one scene at once ask for the same chunks within moments, and each is then
read from the file once and handed out as the same ``bytes`` object (which the broker then encodes and
sends once for all of them, :mod:`farm.plane.broker`). A blob never changes under its name, so a cached
chunk is never stale; the cache is bounded whatever the requests (bench/fanout.py measures it).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from common.hashing import BlobError, check_sha, file_sha256
from common.limits import MAX_UPLOAD_BYTES

MAX_PARTIALS = 256
"""Unfinished worker uploads kept at once (a worker uploads one output at a time per task)."""

PARTIAL_IDLE_SECONDS = 3600.0
"""An unfinished upload that got no chunk for this long is abandoned (its worker resumes from scratch)."""

READ_CACHE_BYTES = int(float(os.environ.get("RENDERHIVE_BLOB_READ_CACHE", 32 * 1024**2)))
"""Bytes of recently read chunks kept for the next worker asking for the same ones (0: none)."""

READ_CACHE_MAX_READ = 1024**2
"""Reads longer than this bypass the read cache (whole-blob reads are not worker-plane chunks)."""


class BlobStore:
    def __init__(self, root: Path, max_bytes: int = MAX_UPLOAD_BYTES, max_partials: int = MAX_PARTIALS,
                 partial_idle: float = PARTIAL_IDLE_SECONDS, read_cache_bytes: int | None = None):
        self.root = Path(root)
        self.read_cache = ChunkCache(READ_CACHE_BYTES if read_cache_bytes is None else read_cache_bytes)
        self._root = str(self.root)
        self.max_bytes = max_bytes
        self.max_partials = max_partials
        self.partial_idle = partial_idle
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        # told (sha, size) of every blob a creator stored (write_stream, adopt; not workers' outputs): the
        # sealed channel seals big ones then, before workers ask (farm.store.sealed)
        self.stored_hook: Callable[[str, int], None] | None = None

    def path(self, sha: str) -> Path:
        check_sha(sha)
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        check_sha(sha)  # os.stat of a joined string: this runs for every chunk a worker asks for
        return os.stat(os.path.join(self._root, sha[:2], sha)).st_size

    def file_size(self, sha: str) -> int | None:
        """The size of blob ``sha``, None when it is not stored (``has`` and ``size`` in one stat)."""
        check_sha(sha)
        try:
            st = os.stat(os.path.join(self._root, sha[:2], sha))
        except OSError as exc:  # as Path.is_file: these mean "not there", others are raised
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                return None
            raise
        except ValueError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def missing(self, hashes: Iterable[str]) -> list[str]:
        return [h for h in dict.fromkeys(hashes) if not self.has(h)]

    def read(self, sha: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:  # f.read(-1) would read the whole blob into memory
            raise BlobError(f"offset {offset} and length {length} must not be negative")
        if length > READ_CACHE_MAX_READ or not self.read_cache.cap:
            return self._read(sha, offset, length)
        key = (sha, offset, length)
        data = self.read_cache.get(key)
        if data is None:
            data = self._read(sha, offset, length)
            self.read_cache.put(key, data)
        return data

    def _read(self, sha: str, offset: int, length: int) -> bytes:
        with open(self.path(sha), "rb") as f:
            size = os.fstat(f.fileno()).st_size  # bounded by the blob: a length of 2**63 reads no more
            if offset >= size:
                return b""
            f.seek(offset)
            return f.read(min(length, size - offset))

    def _commit(self, tmp: Path, sha: str) -> Path:
        dest = self.path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return dest

    def adopt(self, verified: Path, sha: str) -> Path:
        """Move a file whose sha256 the caller has checked to be ``sha`` into place as that blob (a rename on
        the same disk: atomic; the resumable uploads of :mod:`farm.store.uploads`)."""
        size = verified.stat().st_size
        dest = self._commit(verified, sha)
        self._stored(sha, size)
        return dest

    def _stored(self, sha: str, size: int) -> None:
        if self.stored_hook is not None:
            self.stored_hook(sha, size)

    def write_stream(self, sha: str, chunks: Iterable[bytes]) -> int:
        """Store the bytes of ``chunks`` as blob ``sha``; raise BlobError (storing nothing) if they do
        not hash to ``sha`` or exceed the size limit. Returns the size."""
        check_sha(sha)
        h = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.root / "tmp")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise BlobError(f"blob is larger than the {self.max_bytes} byte limit")
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != sha:
                raise BlobError(f"content hashes to {h.hexdigest()}, not {sha}: the upload was corrupted, "
                                "send it again")
            self._commit(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)
        self._stored(sha, size)
        return size

    def write_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            self.write_stream(sha, [data])
        return sha

    # ----------------------------------------------------------- chunked uploads from workers
    def partial_offset(self, sha: str) -> int:
        p = self.root / "partial" / check_sha(sha)
        return p.stat().st_size if p.exists() else 0

    def put_chunk(self, sha: str, offset: int, total: int, data: bytes) -> tuple[int, bool, bool]:
        """Append a chunk at ``offset``. Returns (bytes stored, finished, chunk taken). A chunk at any
        other offset than the stored size is not taken (the sender resumes from the bytes stored)."""
        check_sha(sha)
        if self.has(sha):
            return self.size(sha), True, True  # the stored size, not the one this sender declares
        if not 0 <= total <= self.max_bytes:
            raise BlobError(f"declared size {total} is not between 0 and the {self.max_bytes} byte limit")
        part = self.root / "partial" / sha
        have = part.stat().st_size if part.exists() else 0
        if part.exists() and have >= total:
            # Complete but never verified (the coordinator stopped between the last write and the check), or
            # begun under a larger declared size: no chunk could ever finish it, and a sender that resumes
            # from ``have`` would wait forever. Finish it now, or start over.
            if have == total and file_sha256(part) == sha:
                self._commit(part, sha)
                return have, True, True
            part.unlink()
            have = 0
        if offset != have or offset + len(data) > total:
            return have, False, False
        if not have:
            if not data and total:
                return 0, False, True  # a probe of an upload not begun: nothing to create
            self._make_room()
        with open(part, "ab") as f:
            f.write(data)
        have += len(data)
        if have < total:
            return have, False, True
        if file_sha256(part) != sha:
            part.unlink()
            raise BlobError(f"uploaded bytes do not hash to {sha}: upload discarded, send it again")
        self._commit(part, sha)
        return have, True, True

    def _make_room(self) -> None:
        """Before a new partial upload: delete idle ones; refuse when max_partials are still in progress."""
        now, live = time.time(), 0
        for p in (self.root / "partial").iterdir():
            try:
                idle = now - p.stat().st_mtime
            except FileNotFoundError:
                continue
            if idle > self.partial_idle:
                p.unlink(missing_ok=True)
            else:
                live += 1
        if live >= self.max_partials:
            raise BlobError(f"{live} uploads are in progress on the coordinator, its limit: send this output "
                            "again later")


class ChunkCache:
    """An LRU of ``bytes`` by key, at most ``cap`` bytes of values in all; safe from several threads."""

    def __init__(self, cap: int):
        self.cap = max(0, cap)
        self.size = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def peek(self, key: tuple) -> bytes | None:
        """``get`` for a caller that reads the chunk elsewhere on a miss (not counted as one here)."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.cap:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._items[key] = data
            self.size += len(data)
            while self.size > self.cap:
                _, gone = self._items.popitem(last=False)
                self.size -= len(gone)


def read_chunks(f: BinaryIO, size: int = 1 << 20) -> Iterable[bytes]:
    return iter(lambda: f.read(size), b"")
