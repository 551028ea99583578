"""The worker's local blob cache: content-addressed files, LRU-evicted to a byte cap.

Complete blobs live at ``ROOT/<sha256>``; downloads in progress at ``ROOT/partial/<sha256>.part`` so a
download resumes after a worker restart from the bytes it already has. A blob is only moved into place
after its hash was verified. Blobs in use by a running task are pinned and never evicted.

Several workers of one host may share a cache folder: a download is :meth:`claim`-ed with an exclusive
``flock`` on its partial file, held until the blob is verified and moved into place (or the download
stops), so two processes never append to one partial file, and a second worker waits for the first to
finish instead of fetching the same bytes again. Pins are per process: a worker sharing the folder may
evict a blob another one is about to use (it is then fetched again, never used corrupt).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from common.hashing import check_sha


class BlobCache:
    def __init__(self, root: Path, cap_bytes: int):
        self.root = Path(root)
        self.cap = cap_bytes
        self.partial_dir = self.root / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.pinned: dict[str, int] = {}

    def path(self, sha: str) -> Path:
        return self.root / check_sha(sha)

    def partial(self, sha: str) -> Path:
        return self.partial_dir / f"{check_sha(sha)}.part"

    def has(self, sha: str) -> bool:
        p = self.path(sha)
        if p.is_file():
            os.utime(p)  # recency for LRU
            return True
        return False

    def hashes(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.is_file() and len(p.name) == 64]

    def pin(self, sha: str) -> None:
        self.pinned[sha] = self.pinned.get(sha, 0) + 1

    def unpin(self, sha: str) -> None:
        n = self.pinned.get(sha, 0) - 1
        if n <= 0:
            self.pinned.pop(sha, None)
        else:
            self.pinned[sha] = n

    def claim(self, sha: str) -> BinaryIO | None:
        """The partial download of ``sha`` opened for appending (at its end: the bytes already there are
        kept) and locked for this process; None while another process holds it (a worker sharing this
        folder downloads it: wait and claim again). After a successful claim check :meth:`has` first: the
        other process may have finished it meanwhile (then :meth:`release` the claim)."""
        f = open(self.partial(sha), "ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def release(self, f: BinaryIO, sha: str) -> None:
        """End a claim without committing; an empty partial file (a claim that found the blob done) goes."""
        try:
            if not os.fstat(f.fileno()).st_size and os.path.exists(self.partial(sha)):
                self.partial(sha).unlink(missing_ok=True)
        finally:
            f.close()

    def commit(self, part: Path, sha: str) -> Path:
        dest = self.path(sha)
        os.replace(part, dest)
        self.evict(keep={sha})
        return dest

    def evict(self, keep: set[str] = frozenset()) -> list[str]:
        """Delete least recently used blobs until the cache fits its cap. Returns the evicted hashes."""
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.iterdir()
                 if p.is_file() and len(p.name) == 64]
        total = sum(size for _, size, _ in files)
        evicted = []
        for _, size, p in sorted(files):
            if total <= self.cap:
                break
            if p.name in keep or p.name in self.pinned:
                continue
            p.unlink(missing_ok=True)
            total -= size
            evicted.append(p.name)
        return evicted
