"""Resumable uploads over HTTP: big files survive a dropped connection and are sent on from where they broke.

    GET    /api/blobs/{sha256}/upload                     -> {"offset": bytes the farm has, "size", "complete"}
    PATCH  /api/blobs/{sha256}/upload?offset=N&size=TOTAL  body: the file's bytes from N (all the rest, or less)
    DELETE /api/blobs/{sha256}/upload                     -> abandon your unfinished upload of it

The bytes are appended to the caller's partial as they stream in (:mod:`farm.store.uploads`), so when the
connection drops, everything that arrived stays; the client asks where it stands and sends the rest. A
PATCH at any other offset than the partial's end is 409 with the end in ``Upload-Offset`` and in the
message. When the last byte arrives the file is hashed; a match becomes blob ``sha256`` (201), anything
else is discarded (422). The guard (:mod:`farm.web.guard`) applies here as to ``PUT /api/blobs``: a known
token before any byte of the body is read, the blob size limit, and the per-user upload rate.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from common.hashing import check_sha
from farm.store.blobs import BlobError
from farm.store.db import session as new_session
from farm.store.models import Blob
from farm.store.uploads import OffsetMismatch, UploadArea, UploadError
from farm.web.deps import Api


def record_blob(engine, sha: str, size: int, origin: str = "upload") -> None:
    """The database row of a blob just stored (once)."""
    record_blobs(engine, [(sha, size)], origin)


def record_blobs(engine, stored: list[tuple[str, int]], origin: str = "upload") -> None:
    """The database rows of blobs just stored (each once), in one transaction (a batch upload)."""
    with new_session(engine) as s:
        added = False
        for sha, size in stored:
            if not s.get(Blob, sha):
                s.add(Blob(sha256=sha, size=size, origin=origin))
                added = True
        if added:
            s.commit()


def _refusal(exc: BlobError) -> HTTPException:
    headers = {"Upload-Offset": str(exc.offset)} if isinstance(exc, OffsetMismatch) else None
    return HTTPException(getattr(exc, "status", 422), str(exc), headers=headers)


def upload_router(api: Api, area: UploadArea) -> APIRouter:
    r = APIRouter()
    engine, blobs, UserDep = api.engine, api.blobs, api.UserDep

    @r.get("/api/blobs/{sha256}/upload")
    def standing(sha256: str, user: UserDep) -> dict[str, Any]:
        """Where your upload of ``sha256`` stands: ``offset`` bytes the farm has (0: not begun), of ``size``."""
        try:
            return area.standing(user.id, sha256).to_json()
        except BlobError as exc:
            raise _refusal(exc) from None

    @r.delete("/api/blobs/{sha256}/upload")
    def abandon(sha256: str, user: UserDep) -> dict[str, Any]:
        try:
            return {"sha256": sha256, "discarded": area.discard(user.id, sha256)}
        except BlobError as exc:
            raise _refusal(exc) from None

    @r.patch("/api/blobs/{sha256}/upload", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def extend(sha256: str, request: Request, user: UserDep, offset: int = Query(ge=0),
                     size: int = Query(ge=0)) -> Any:
        """Append the body at ``offset`` to your upload of ``sha256`` (``size``: the whole file's bytes)."""
        try:
            check_sha(sha256)
        except BlobError as exc:
            raise _refusal(exc) from None
        if blobs.has(sha256):
            return {"sha256": sha256, "offset": blobs.size(sha256), "size": blobs.size(sha256), "complete": True,
                    "stored": False, "received": 0}
        left = size - offset
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max(left, 0):
            raise HTTPException(413, f"the body ({declared} bytes) is longer than the {max(left, 0)} bytes left of "
                                     f"this upload from offset {offset} to its size {size}: send only the rest")
        uid = user.id
        try:
            area.claim(uid, sha256)
        except BlobError as exc:
            raise _refusal(exc) from None
        try:
            try:
                path = area.open(uid, sha256, offset, size)
            except BlobError as exc:
                raise _refusal(exc) from None
            got, gone = 0, False
            with open(path, "ab") as f:
                try:
                    async for chunk in request.stream():
                        if got + len(chunk) > left:
                            f.flush()
                            f.truncate(offset)
                            raise HTTPException(413, f"the body carried more than the {left} bytes left of this "
                                                     f"upload (offset {offset}, size {size}): those bytes were "
                                                     f"dropped; resume from offset {offset} with the rest only")
                        f.write(chunk)
                        got += len(chunk)
                        area.count(uid, sha256, len(chunk))
                except ClientDisconnect:   # the connection dropped: what arrived stays, to be resumed
                    gone = True
            area.touch(path)
            if gone:
                raise ClientDisconnect()
            end = offset + got
            if end < size:
                return {"sha256": sha256, "offset": end, "size": size, "complete": False, "received": got}
            try:
                stored = await asyncio.to_thread(area.finish, uid, sha256, path)
            except UploadError as exc:
                raise _refusal(exc) from None
            await asyncio.to_thread(record_blob, engine, sha256, stored)
            return JSONResponse({"sha256": sha256, "offset": stored, "size": stored, "complete": True,
                                 "stored": True, "received": got}, status_code=201)
        finally:
            area.release(uid, sha256)

    return r
