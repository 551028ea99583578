"""Users and content-addressed uploads. Ask ``POST /api/blobs/missing`` first, then ``PUT /api/blobs/{sha256}``
only those: re-submitting a scene uploads nothing (files above the client's threshold go through the
resumable route instead, :mod:`farm.web.api_uploads`). A body is streamed to a temporary file and refused the
moment it passes the size limit; its hash is verified before it is stored.
"""
import asyncio
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
from farm.web.api_uploads import record_blob
from farm.web.deps import Api
from farm.web.schemas import CreditLine, MissingRequest, UserCreate


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

    return r
