"""The first thing every HTTP request meets: who is asking, and how many bytes they may send, decided from
the request line and headers before a byte of the body is read.

A pure ASGI middleware (no body buffering of its own):

* **authentication before the body**: an ``/api/`` request that carries a body (POST, PUT, PATCH) and is
  not one of the open routes (:data:`OPEN`) needs ``Authorization: Bearer <token>`` of a known user;
  otherwise it is answered 401 at once and its body is never read, so an anonymous client cannot make
  the coordinator read (or parse) a gigabyte to tell it no;
* **a body limit per route**, on the declared ``Content-Length`` first (413 before reading) and on the
  bytes actually streamed (413 the moment they pass it, for chunked bodies that declare nothing): blob
  uploads may be as large as the blob store allows, JSON requests :data:`JSON_LIMIT`, the pages' forms
  :data:`FORM_LIMIT`.

The routes keep their own checks (the upload route streams to disk and verifies the hash); this only makes
sure that what reaches them is bounded and comes from someone the farm knows.
"""
from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

from starlette.exceptions import HTTPException

from farm.store.db import session as new_session
from farm.web import auth

JSON_LIMIT = 4 * 1024 * 1024
"""Largest JSON body of an API request: a diffusion job of 1,000 prompts of 2,000 characters, or the
hash list of a 10,000-file upload check, fits with room to spare."""

FORM_LIMIT = 64 * 1024
"""Largest body of a page's form (sign-in, approve, reject with a reason)."""

OPEN: frozenset[tuple[str, str]] = frozenset()
"""API routes with a body that need no token (none: every API call is a known user's; the pages' sign-in
form is not under /api/)."""

BODY_METHODS = {"POST", "PUT", "PATCH"}


def _limit(method: str, path: str, blob_limit: int) -> int:
    if method == "PUT" and path.startswith("/api/blobs/"):
        return blob_limit
    return JSON_LIMIT if path.startswith("/api/") else FORM_LIMIT


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _too_big(what: str, limit: int, size: str) -> str:
    if what.startswith("PUT /api/blobs/"):
        return (f"upload of {size} bytes exceeds the {limit} byte limit: reduce the scene (pack fewer or smaller "
                "textures)")
    return f"the body of {what} ({size} bytes) exceeds its {_human(limit)} limit: send less per request"


class Guard:
    """ASGI middleware: see the module docstring. ``engine`` finds users by token; ``blob_limit`` is the
    blob store's largest upload."""

    def __init__(self, app, engine, blob_limit: int):
        self.app, self.engine, self.blob_limit = app, engine, blob_limit

    async def __call__(self, scope, receive: Callable[[], Awaitable[dict]], send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = _limit(method, path, self.blob_limit)
        what = f"{method} {path}"
        if path.startswith("/api/") and (method, path) not in OPEN and not await self._known(headers):
            return await _answer(send, 401, "missing or unknown API token: pass 'Authorization: Bearer <token>' "
                                            "(farm --token, or RENDERHIVE_TOKEN); the body was not read")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _answer(send, 400, f"Content-Length {declared[:40]!r} is not a number of bytes")
            if int(declared) > limit:
                return await _answer(send, 413, _too_big(what, limit, declared))
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:  # an HTTPException: the app's own handlers answer it (413, JSON)
                    raise HTTPException(413, _too_big(what, limit, f"over {limit}"))
            return msg

        started = False

        async def tracked(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except HTTPException as exc:  # raised where no handler of the app could answer it
            if not started:
                await _answer(send, exc.status_code, str(exc.detail))

    async def _known(self, headers: dict[str, str]) -> bool:
        token = auth.bearer_token(headers.get("authorization"))
        if not token or len(token) > 200:
            return False
        return await asyncio.to_thread(self._lookup, token)

    def _lookup(self, token: str) -> bool:
        with new_session(self.engine) as s:
            return auth.user_for_token(s, token) is not None


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
