"""Users and content-addressed uploads. Ask ``POST /api/blobs/missing`` first, then ``PUT /api/blobs/{sha256}``
only those: re-submitting a scene uploads nothing (files above the client's threshold go through the
resumable route instead, :mod:`farm.web.api_uploads`). A body is streamed to a temporary file and refused the
moment it passes the size limit; its hash is verified before it is stored.

Many small files (a project of 2,000 textures) go in batches: ``POST /api/blobs/batch``, whose body is one
JSON line ``{"blobs": [[sha256, size], ...]}`` (at most :data:`BATCH_FILES`) and then the blobs' bytes one
after the other in that order. The whole body is bounded by the guard's JSON limit (4 MiB) before it is
read, and a batch is one request against the per-user upload rate (measured in bench/upload.py: 2,000
files of 500 bytes in 20 requests instead of 2,000, which at the default 600 a minute means 2 minutes of
waiting saved). Every blob's length and hash are checked before any is stored: a batch is stored whole
or not at all (422 naming the first bad entry).
"""
import asyncio
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from sqlmodel import select

from common.hashing import check_sha
from farm.store.blobs import BlobError
from farm.store.models import User
from farm.web import auth
from farm.web.api_uploads import record_blob, record_blobs
from farm.web.deps import Api
from farm.web.schemas import CreditLine, MissingRequest, UserCreate

BATCH_FILES = 100
"""Most blobs in one batch: one request against the upload rate stands for at most this many files (each a
hash and a file written), so the rate still bounds how many files a user can make the farm write."""


def parse_batch(body: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    """The (sha256, bytes) of a batch body (see the module docstring), each verified; HTTPException 422 on
    the first thing wrong, naming it."""
    head, nl, rest = body.partition(b"\n")
    if not nl:
        raise HTTPException(422, "a batch body starts with one JSON line {\"blobs\": [[sha256, size], ...]} and "
                                 "a newline, then the blobs' bytes")
    try:
        entries = json.loads(head)["blobs"]
        entries = [(str(sha), int(size)) for sha, size in entries]
    except (ValueError, KeyError, TypeError):
        raise HTTPException(422, "the batch's first line is not {\"blobs\": [[sha256, size], ...]}: send the "
                                 "hash and byte size of each blob in body order") from None
    if not 0 < len(entries) <= BATCH_FILES:
        raise HTTPException(422, f"a batch holds 1 to {BATCH_FILES} blobs, not {len(entries)}: split it")
    if sum(size for _, size in entries) != len(rest) or any(size < 0 for _, size in entries):
        raise HTTPException(422, f"the batch's sizes add up to {sum(size for _, size in entries)} bytes but "
                                 f"{len(rest)} bytes follow the first line: nothing was stored, send it again")
    out, at = [], 0
    for i, (sha, size) in enumerate(entries):
        try:
            check_sha(sha)
        except BlobError as exc:
            raise HTTPException(422, f"blob {i} of the batch: {exc}") from None
        if size > max_bytes:
            raise HTTPException(413, f"blob {i} of the batch ({size} bytes) exceeds the {max_bytes} byte limit")
        data = rest[at:at + size]
        at += size
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise HTTPException(422, f"blob {i} of the batch hashes to {got}, not {sha}: nothing was stored, "
                                     "send the batch again")
        out.append((sha, data))
    return out


def blob_router(api: Api) -> APIRouter:
    r = APIRouter()
    engine, blobs = api.engine, api.blobs
    SessionDep, UserDep = api.SessionDep, api.UserDep

    @r.post("/api/users", status_code=201)
    def create_user(body: UserCreate, user: UserDep, s: SessionDep) -> dict[str, Any]:
        if not user.is_admin:
            raise HTTPException(403, "only the admin creates users (use the token in DATA/admin.token)")
        if s.exec(select(User).where(User.name == body.name)).first():
            raise HTTPException(409, f"user {body.name!r} exists already: pick another name")
        new, token = auth.create_user(s, body.name)
        new.credit_line = body.credit_line
        s.add(new)
        s.commit()
        return {"id": new.id, "name": new.name, "token": token, "credit_line": new.credit_line}

    @r.put("/api/users/{name}/credit")
    def set_credit(name: str, body: CreditLine, user: UserDep, s: SessionDep) -> dict[str, Any]:
        """Give or take a creator's credit line: with one, its jobs are leased before their deposit is
        confirmed in escrow (the deposit is still taken; the operator carries the risk meanwhile)."""
        if not user.is_admin:
            raise HTTPException(403, "only the admin sets credit lines (use the token in DATA/admin.token)")
        target = s.exec(select(User).where(User.name == name)).first()
        if target is None:
            raise HTTPException(404, f"no user {name!r}: create it first (farm user {name})")
        target.credit_line = body.credit_line
        s.add(target)
        s.commit()
        return {"name": target.name, "credit_line": target.credit_line}

    @r.post("/api/blobs/missing")
    def missing(body: MissingRequest, user: UserDep) -> dict[str, list[str]]:
        try:
            return {"missing": blobs.missing(check_sha(h) for h in body.hashes)}
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None

    @r.put("/api/blobs/{sha256}", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_blob(sha256: str, request: Request, user: UserDep) -> dict[str, Any]:
        """Store the request body as blob ``sha256`` (the sha256 of the bytes, lowercase hex)."""
        try:
            check_sha(sha256)
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None
        too_big = f"exceeds the {blobs.max_bytes} byte limit: reduce the scene (pack fewer or smaller textures)"
        length = request.headers.get("content-length")
        try:
            declared = int(length) if length is not None else 0
        except ValueError:
            raise HTTPException(400, f"Content-Length {length[:40]!r} is not a number of bytes") from None
        if declared > blobs.max_bytes:
            raise HTTPException(413, f"upload of {length} bytes {too_big}")
        if blobs.has(sha256):
            return {"sha256": sha256, "size": blobs.size(sha256), "stored": False}
        fd, name = tempfile.mkstemp(dir=blobs.root / "tmp", suffix=".upload")
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > blobs.max_bytes:
                        raise HTTPException(413, f"upload {too_big}")
                    f.write(chunk)
            with open(name, "rb") as f:
                size = await asyncio.to_thread(blobs.write_stream, sha256, iter(lambda: f.read(1 << 20), b""))
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None
        finally:
            Path(name).unlink(missing_ok=True)
        record_blob(engine, sha256, size)
        return {"sha256": sha256, "size": size, "stored": True}

    @r.post("/api/blobs/batch", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_batch(request: Request, user: UserDep) -> dict[str, Any]:
        """Store up to BATCH_FILES small blobs in one request (see the module docstring for the body)."""
        body = await request.body()   # bounded by the guard (JSON_LIMIT) before and while it is read
        items = await asyncio.to_thread(parse_batch, body, blobs.max_bytes)

        def store() -> list[tuple[str, int]]:
            new = []
            for sha, data in items:
                if not blobs.has(sha):
                    blobs.write_stream(sha, [data])
                    new.append((sha, len(data)))
            return new
        try:
            new = await asyncio.to_thread(store)
        except BlobError as exc:
            raise HTTPException(422, str(exc)) from None
        await asyncio.to_thread(record_blobs, engine, new)
        return {"stored": [sha for sha, _ in new], "had": len(items) - len(new),
                "bytes": sum(size for _, size in new)}

    return r
