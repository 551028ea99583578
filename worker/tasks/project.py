"""Lay a project out on the worker: the tree of a manifest, made of hard links to the task's input blobs.

The daemon has fetched (hash-verified) and staged every input of the lease; for a project task those are
the manifest and, fetched after it, every file it names (:func:`named_blobs`: the lease's inputs name the
manifest, and the coordinator serves its files to the lease holder). :func:`lay_out`
reads the manifest from its staged blob, checks it with the same :func:`common.manifest.loads` as the
coordinator (never trusting that it did), and builds ``ROOT/<path>`` for every entry as a hard link to the
staged blob (a copy across filesystems). Invariants:

* every path is created strictly below ``root`` (normalized relative paths only; each parent is a real
  folder made here, never a symlink; ``O_EXCL``-style creation: an existing entry is an error);
* the tree is read-only: files 0444, folders 0555 once complete; inside the sandbox it lies in the
  child's ``inputs`` folder, which is bound read-only again;
* a blob the manifest names but the lease did not stage is refused (a worker fetches only what it leases).

The Blender child then opens ``root/<scene>`` and the scene checks allow exactly the paths that resolve
inside ``root`` (:mod:`worker.runtimes.scene_checks`).
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from common.manifest import MAX_MANIFEST_BYTES, MAX_PROJECT_BYTES, Manifest, ManifestError, loads


class LayoutError(ValueError):
    """The project cannot be laid out; the creator's manifest is at fault."""


def read_manifest(path: Path) -> Manifest:
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise LayoutError(f"the project manifest is {size} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        return loads(path.read_bytes())
    except ManifestError as exc:
        raise LayoutError(f"project manifest refused: {exc}") from None


def named_blobs(spec: dict, fetched: dict[str, Path]) -> list[str]:
    """The blobs a project task's manifest names that its inputs did not (the coordinator names the
    manifest only; the daemon fetches these after it, each verified by its hash as any input). Empty for a
    task without a project, or before its manifest is fetched."""
    project = spec.get("project") if isinstance(spec, dict) else None
    msha = project.get("manifest_sha256") if isinstance(project, dict) else None
    if not isinstance(msha, str) or msha not in fetched:
        return []
    return [h for h in dict.fromkeys(read_manifest(fetched[msha]).hashes()) if h not in fetched]


def lay_out(root: Path, manifest: Manifest, staged: dict[str, Path]) -> Path:
    """Build the tree of ``manifest`` under ``root`` (which must not exist). Returns the scene's path."""
    absent = [p for p, h in manifest.files.items() if h not in staged]
    if absent:
        raise LayoutError(f"the lease does not name the blob of {absent[0]!r}: the coordinator sent an "
                          "incomplete task")
    total = sum(staged[h].stat().st_size for h in set(manifest.files.values()))
    if total > MAX_PROJECT_BYTES:
        raise LayoutError(f"the project holds {total} bytes, more than {MAX_PROJECT_BYTES}")
    root = Path(os.path.abspath(root))
    root.mkdir(parents=True, exist_ok=False)
    folders = [root]
    for rel, sha in manifest.files.items():
        parent = root
        for part in rel.split("/")[:-1]:
            parent = parent / part
            try:
                os.mkdir(parent, 0o755)
                folders.append(parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(parent).st_mode):  # never follow a link out of the tree
                    raise LayoutError(f"{rel!r}: {part!r} is not a folder in the tree") from None
        dst = parent / rel.rsplit("/", 1)[-1]
        try:
            os.link(staged[sha], dst)
        except FileExistsError:
            raise LayoutError(f"{rel!r} is in the tree already") from None
        except OSError:  # another filesystem, or no hard links: a copy
            shutil.copyfile(staged[sha], dst)
            os.chmod(dst, 0o444)
    for d in reversed(folders):
        os.chmod(d, 0o555)
    return root / manifest.scene


def remove(root: Path) -> None:
    """Delete a laid-out tree (its folders are read-only: made writable first)."""
    if not root.exists():
        return
    for dirpath, dirnames, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(root, ignore_errors=True)
