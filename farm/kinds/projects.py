"""A frame job over a *project* (a scene and the files it reads) instead of a single .blend.

The request carries the manifest (:mod:`common.manifest`: path relative to the project root → sha256),
checked here before anything is written; a refused manifest stores nothing (no blob, no job):

* the manifest itself: :func:`common.manifest.parse` (normalized relative paths only, no ``..``, no
  absolute path, no duplicate, at most MAX_PROJECT_FILES files) → 422;
* every blob it names must be uploaded → 409 naming the first missing paths; their sizes, read from this
  store (never from the creator), at most MAX_PROJECT_BYTES together → 413;
* the scene's blob must be the manifest's scene, and a .blend (its header).

Accepted, the canonical manifest is stored as a blob of its own, and every task that opens the scene gets
``spec["project"] = {"manifest_sha256", "scene"}`` and the manifest as an input, which stands for every
file it names: a worker fetches only blobs its leases name (the manifest's files through it,
:class:`ManifestFiles`), so it can fetch the whole tree and nothing else.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sqlmodel import Session

from common.manifest import MAX_MANIFEST_BYTES, MAX_PROJECT_BYTES, Manifest, ManifestError, loads, parse
from farm.kinds.frames import TaskPlan
from farm.store.blobs import BlobError, BlobStore
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
    """Give every task that opens the scene the project: its spec names it, its inputs the manifest, which
    stands for every file it names (the worker fetches them after it, and a lease holding the manifest may:
    farm.core.blob_requests). A task row holds two hashes however many files the project has: listing them
    all made a 2,000-file project's 20,000-task job write 2.7 GB of task rows, and every TASK carry 134 KB.
    ``allow_missing``: the creator chose to render without the files it listed as missing."""
    for p in plans:
        if "scene_sha256" in p.spec:
            p.spec["project"] = {"manifest_sha256": manifest_sha, "scene": manifest.scene}
            if allow_missing:
                p.spec["allow_missing"] = True
            p.inputs = list(dict.fromkeys([*p.inputs, manifest_sha]))


class ManifestFiles:
    """The blobs each stored project manifest names, read from the blob store and kept for the ``size``
    manifests used last (each at most MAX_PROJECT_FILES hashes)."""

    def __init__(self, blobs: BlobStore, size: int = 64):
        self.blobs, self.size = blobs, size
        self.sets: OrderedDict[str, frozenset[str]] = OrderedDict()

    def files(self, manifest_sha: str) -> frozenset[str]:
        """The hashes manifest ``manifest_sha`` names; empty when it is no stored manifest."""
        if manifest_sha in self.sets:
            self.sets.move_to_end(manifest_sha)
            return self.sets[manifest_sha]
        try:
            raw = self.blobs.read(manifest_sha, 0, MAX_MANIFEST_BYTES + 1)
            names = frozenset(loads(raw).hashes()) if len(raw) <= MAX_MANIFEST_BYTES else frozenset()
        except (BlobError, OSError, ManifestError):
            names = frozenset()
        self.sets[manifest_sha] = names
        while len(self.sets) > self.size:
            self.sets.popitem(last=False)
        return names

    def names(self, task_spec: Any, sha: str) -> bool:
        """Whether the project of a task with ``task_spec`` (if any) names blob ``sha``."""
        project = task_spec.get("project") if isinstance(task_spec, dict) else None
        msha = project.get("manifest_sha256") if isinstance(project, dict) else None
        return isinstance(msha, str) and sha in self.files(msha)
