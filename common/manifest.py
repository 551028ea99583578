"""Project manifests: the files of a scene's project, by path relative to the project root → sha256.

A creator's scene rarely stands alone: textures sit in folders beside it, libraries are linked from an
asset folder. The creator's side (:mod:`client.project`) traces them and sends a manifest; the coordinator
(:mod:`farm.kinds.jobs`) and the worker (:mod:`worker.tasks.project`) both check it with :func:`parse`
before they trust one byte of it, so the same limits hold on both sides of the worker plane.

Shape (JSON)::

    {"scene": "shots/a.blend", "files": [{"path": "shots/a.blend", "sha256": "…"}, …]}

Invariants of a manifest that passes :func:`parse`:

* at most :data:`MAX_PROJECT_FILES` files, each path a *normalized relative POSIX path*: no leading ``/``,
  no ``.`` or ``..`` component, no empty component, no backslash, no control character, no drive letter,
  at most :data:`MAX_PATH_CHARS` characters and :data:`MAX_PATH_DEPTH` components; so every path stays
  inside the folder it is laid out in, whatever that folder is;
* no path twice, and no path that is both a file and a folder of another (``a`` and ``a/b``);
* every sha256 well formed (:func:`common.hashing.check_sha`); the scene is one of the files and a
  ``.blend``.

Sizes are not in the manifest: the coordinator counts them from its own blob store (the truth), against
:data:`MAX_PROJECT_BYTES`; a worker counts what it fetched.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from common.limits import json_nesting

if __name__.endswith("renderhive_manifest"):   # the add-on's bundled copy: remote.py loaded its dependency first
    _dep = sys.modules[__name__.replace("renderhive_manifest", "renderhive_hashing")]
    BlobError, check_sha = _dep.BlobError, _dep.check_sha
else:
    from common.hashing import BlobError, check_sha

MAX_PROJECT_FILES = int(os.environ.get("RENDERHIVE_MAX_PROJECT_FILES") or 2000)
"""Most files in one project. Bounded by the worker plane: a task's TASK message names every blob of its
project (a worker fetches only blobs its leases name), about 70 bytes each within MAX_MESSAGE_BYTES."""

MAX_PROJECT_BYTES = int(float(os.environ.get("RENDERHIVE_MAX_PROJECT_BYTES") or 32 * 1024**3))
"""Most bytes in one project (all its files together), as stored."""

MAX_PATH_CHARS = 400
"""Longest path in a manifest, in characters."""

MAX_PATH_DEPTH = 32
"""Most folders deep a path may be."""

MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest, as canonical JSON (2,000 entries of 400-character paths fit)."""

_BAD_COMPONENT = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')


class ManifestError(ValueError):
    """A manifest that must not be laid out; the message says which entry and why."""


@dataclass(frozen=True)
class Manifest:
    scene: str
    files: dict[str, str]   # relative path → sha256, in the order given

    def hashes(self) -> list[str]:
        """Every blob of the project, once each (the scene's first)."""
        return list(dict.fromkeys([self.files[self.scene], *self.files.values()]))

    def to_json(self) -> dict[str, Any]:
        return {"scene": self.scene, "files": [{"path": p, "sha256": h} for p, h in sorted(self.files.items())]}

    def canonical(self) -> bytes:
        """The bytes stored as the manifest's blob: the same manifest always gives the same hash."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def check_path(path: Any) -> str:
    """``path`` if it is a normalized relative path that cannot leave the folder it is laid out in."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"path {str(path)[:80]!r} is not a non-empty string")
    shown = repr(path[:80])
    if len(path) > MAX_PATH_CHARS:
        raise ManifestError(f"path {shown}… is longer than {MAX_PATH_CHARS} characters: shorten the folder names")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(f"path {shown} is absolute: a manifest holds paths relative to the project root")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise ManifestError(f"path {shown} is more than {MAX_PATH_DEPTH} folders deep")
    for part in parts:
        if part in ("", ".", ".."):
            raise ManifestError(f"path {shown} is not normalized (empty, '.' or '..' component): "
                                "paths must stay inside the project")
        if _BAD_COMPONENT.search(part) or part != part.strip() or len(part.encode()) > 255:
            raise ManifestError(f"path {shown} has a name with a control character, one of \\ : * ? \" < > |, "
                                "leading or trailing spaces, or more than 255 bytes: rename the file")
    return path


def parse(data: Any) -> Manifest:
    """Check a manifest (the JSON object, already decoded) and return it; raise ManifestError."""
    if not isinstance(data, dict) or set(data) - {"scene", "files"}:
        raise ManifestError("a manifest is an object with 'scene' and 'files' only")
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise ManifestError("'files' must be a non-empty list of {path, sha256}")
    if len(files) > MAX_PROJECT_FILES:
        raise ManifestError(f"the project has {len(files)} files, more than the {MAX_PROJECT_FILES} a job may "
                            "ship: pack small textures into the .blend, or split the project")
    out: dict[str, str] = {}
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or set(entry) != {"path", "sha256"}:
            raise ManifestError(f"files[{i}] must be an object with 'path' and 'sha256'")
        path = check_path(entry["path"])
        try:
            sha = check_sha(entry["sha256"])
        except BlobError as exc:
            raise ManifestError(f"files[{i}] ({path!r}): {exc}") from None
        if path in out:
            raise ManifestError(f"path {path!r} is listed twice")
        out[path] = sha
    folders = {"/".join(p.split("/")[:k]) for p in out for k in range(1, p.count("/") + 1)}
    clash = sorted(folders & set(out))
    if clash:
        raise ManifestError(f"{clash[0]!r} is both a file and a folder of other files")
    scene = data.get("scene")
    if not isinstance(scene, str) or scene not in out:
        raise ManifestError(f"scene {str(scene)[:80]!r} is not one of the manifest's files")
    if not scene.lower().endswith(".blend"):
        raise ManifestError(f"scene {scene!r} is not a .blend file")
    return Manifest(scene, out)


MAX_JSON_NESTING = 16  # a manifest is an object of objects: 3 deep


def loads(raw: bytes) -> Manifest:
    """Parse a stored manifest blob (bounded before decoding)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the manifest is {len(raw)} bytes, more than {MAX_MANIFEST_BYTES}")
    if json_nesting(raw, MAX_JSON_NESTING) > MAX_JSON_NESTING:  # before json.loads: see common.limits
        raise ManifestError(f"the manifest is not JSON of a manifest's shape: nested more than {MAX_JSON_NESTING} deep")
    try:
        return parse(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"the manifest is not JSON: {exc}") from None
