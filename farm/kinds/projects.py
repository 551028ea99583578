"""A frame job over a *project* (a scene and the files it reads) instead of a single .blend.

The request carries the manifest (:mod:`common.manifest`: path relative to the project root → sha256),
checked here before anything is written; a refused manifest stores nothing (no blob, no job):

* the manifest itself: :func:`common.manifest.parse` (normalized relative paths only, no ``..``, no
  absolute path, no duplicate, at most MAX_PROJECT_FILES files) → 422;
* every blob it names must be uploaded → 409 naming the first missing paths; their sizes, read from this
  store (never from the creator), at most MAX_PROJECT_BYTES together → 413;
* the scene's blob must be the manifest's scene, and a .blend (its header).

Accepted, the canonical manifest is stored as a blob of its own, and every task that opens the scene gets
``spec["project"] = {"manifest_sha256", "scene"}`` and the manifest and every file's blob as inputs: a
worker fetches only blobs its leases name, so it can fetch the whole tree and nothing else.
"""
from __future__ import annotations

from typing import Any

from sqlmodel import Session

from common.manifest import MAX_PROJECT_BYTES, Manifest, ManifestError, parse
from farm.kinds.frames import TaskPlan
from farm.store.blobs import BlobStore
from farm.store.models import Blob

MAX_MISSING_LISTED = 200
"""Most missing files a job's warning lists (``--allow-missing``); the rest are counted."""


class ProjectRefused(ValueError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def check(blobs: BlobStore, raw: Any, scene_sha: str) -> tuple[Manifest, int]:
    """The checked manifest of a request and its total bytes; raise ProjectRefused with the fix."""
    try:
        manifest = parse(raw)
    except ManifestError as exc:
        raise ProjectRefused(f"project manifest refused: {exc}", 422) from None
    if scene_sha and manifest.files[manifest.scene] != scene_sha:
        raise ProjectRefused(f"scene_sha256 is not the blob of the manifest's scene {manifest.scene!r}: send "
                             "the manifest's own hash, or leave scene_sha256 out", 422)
    total, absent = 0, []
    for path, sha in manifest.files.items():
        size = blobs.file_size(sha)
        if size is None:
            absent.append(path)
        else:
            total += size
    if absent:
        raise ProjectRefused(f"{len(absent)} file(s) of the project are not uploaded ("
                             + ", ".join(repr(p) for p in absent[:10]) + (", …" if len(absent) > 10 else "")
                             + "): ask POST /api/blobs/missing and upload those first", 409)
    if total > MAX_PROJECT_BYTES:
        raise ProjectRefused(f"the project holds {total} bytes, more than the {MAX_PROJECT_BYTES} a job may ship: "
                             "leave unused files out or split the project", 413)
    return manifest, total


def missing_warning(raw: Any) -> list[dict[str, str]]:
    """The creator's list of missing files (``--allow-missing``), bounded and reduced to strings."""
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw[:MAX_MISSING_LISTED]:
        if isinstance(item, dict):
            out.append({k: str(item.get(k, ""))[:400] for k in ("path", "used_by", "blend")})
    return out


def store(session: Session, blobs: BlobStore, manifest: Manifest) -> str:
    """Store the canonical manifest as a blob (after every check passed); its sha256."""
    data = manifest.canonical()
    sha = blobs.write_bytes(data)
    if session.get(Blob, sha) is None:
        session.add(Blob(sha256=sha, size=len(data), origin="manifest"))
    return sha


def attach(plans: list[TaskPlan], manifest: Manifest, manifest_sha: str, allow_missing: bool = False) -> None:
    """Give every task that opens the scene the project: its spec names it, its inputs hold every blob.
    ``allow_missing``: the creator chose to render without the files it listed as missing."""
    extra = [manifest_sha, *manifest.hashes()]
    for p in plans:
        if "scene_sha256" in p.spec:
            p.spec["project"] = {"manifest_sha256": manifest_sha, "scene": manifest.scene}
            if allow_missing:
                p.spec["allow_missing"] = True
            p.inputs = list(dict.fromkeys([*p.inputs, *extra]))
