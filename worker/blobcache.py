"""The worker's local blob cache: content-addressed files, LRU-evicted to a byte cap.

Complete blobs live at ``ROOT/<sha256>``; downloads in progress at ``ROOT/partial/<sha256>.part`` so a
download resumes after a worker restart from the bytes it already has. A blob is only moved into place
after its hash was verified. Blobs in use by a running task are pinned and never evicted.
"""
from __future__ import annotations

import os
from pathlib import Path

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
