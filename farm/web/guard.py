"""The first thing every HTTP request meets: who is asking, how many bytes they may send and how often they
may ask, decided from the request line and headers before a byte of the body is read.

A pure ASGI middleware (no body buffering of its own):

* **authentication before the body**: an ``/api/`` request that carries a body (POST, PUT, PATCH) and is
  not one of the open routes (:data:`OPEN`) needs ``Authorization: Bearer <token>`` of a known user;
  otherwise it is answered 401 at once and its body is never read, so an anonymous client cannot make
  the coordinator read (or parse) a gigabyte to tell it no;
* **a body limit per route**, on the declared ``Content-Length`` first (413 before reading) and on the
  bytes actually streamed (413 the moment they pass it, for chunked bodies that declare nothing): blob
  uploads may be as large as the blob store allows, JSON requests :data:`JSON_LIMIT`, the pages' forms
  :data:`FORM_LIMIT`;
* **a rate per user** on what is costly to create (:func:`rate_kind`): job submissions (``POST /api/jobs``,
  ``POST /api/jobs/diffusion``) and blob uploads (``PUT /api/blobs/...``, and each resumed piece,
  ``PATCH /api/blobs/.../upload``), each a token bucket per
  authenticated user (:class:`RateLimiter`), answered 429 with ``Retry-After`` when empty. Every attempt
  costs a token, refused or not: a refused submission still costs the coordinator its parse and checks.
  The buckets live in an LRU of :data:`RATE_USERS` users, so the limiter's memory is bounded whatever the
  number of tokens; a user pushed out starts again with a full bucket, which costs at most one burst.

Connections, header and body timeouts are below this, in the HTTP protocol (:mod:`farm.web.connections`):
by the time a request reaches this middleware its head is complete.

The routes keep their own checks (the upload route streams to disk and verifies the hash); this only makes
sure that what reaches them is bounded and comes from someone the farm knows.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

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

SUBMITS_PER_MINUTE, SUBMIT_BURST = 30.0, 60
"""Job submissions a user may make (``RENDERHIVE_SUBMITS_PER_MINUTE``, ``RENDERHIVE_SUBMIT_BURST``). One
job holds up to 20,000 tasks, so a person never needs more; a script that does should batch frames into a
job. 60 at once covers ``make demo`` and any test that submits in a loop."""

UPLOADS_PER_MINUTE, UPLOAD_BURST = 600.0, 600
"""Blob uploads a user may make (``RENDERHIVE_UPLOADS_PER_MINUTE``, ``RENDERHIVE_UPLOAD_BURST``): a scene is
one blob (textures packed), so 10 a second sustained is far beyond a creator's need, while a loop of tiny
PUTs (each a temporary file, a hash and a commit) is held to it."""

RATE_USERS = 10_000
"""Users whose buckets are kept (LRU). Users are made by the admin, so this is rarely reached; it bounds the
limiter's memory (about 200 bytes a bucket) whatever happens."""

RATE_ADVICE = {
    "submit": ("job submissions", "put more frames in one job (frames 1-250, --chunk) instead of many jobs"),
    "upload": ("uploads", ("send small files in batches (POST /api/blobs/batch, up to 100 a request; `farm "
                           "submit` does) and skip blobs the farm has (POST /api/blobs/missing); `farm submit` "
                           "waits out this answer by itself")),
}


def _is_upload(method: str, path: str) -> bool:
    """A blob upload: ``PUT /api/blobs/SHA`` whole, or ``PATCH /api/blobs/SHA/upload`` resumed."""
    return path.startswith("/api/blobs/") and (method == "PUT" or (method == "PATCH" and path.endswith("/upload")))


def _limit(method: str, path: str, blob_limit: int) -> int:
    if _is_upload(method, path):
        return blob_limit
    return JSON_LIMIT if path.startswith("/api/") else FORM_LIMIT


def rate_kind(method: str, path: str) -> str | None:
    """Which rate limit a request counts against, if any."""
    if method == "POST" and path in ("/api/jobs", "/api/jobs/diffusion"):
        return "submit"
    if _is_upload(method, path) or (method == "POST" and path == "/api/blobs/batch"):  # a batch: one token
        return "upload"
    return None


class RateLimiter:
    """Token buckets, one per key (a user id), ``burst`` tokens refilled at ``per_minute``; at most
    ``max_keys`` buckets, the least recently used dropped first. Event-loop thread only."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = RATE_USERS, clock=time.monotonic):
        self.rate, self.burst, self.max_keys, self.clock = per_minute / 60.0, max(1, burst), max_keys, clock
        self.buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def take(self, key: int) -> float:
        """Take a token for ``key``: 0.0 when there was one, else the seconds until there will be."""
        now = self.clock()
        tokens, then = self.buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else math.inf
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return wait


def rate_limiters_from_env() -> dict[str, RateLimiter]:
    def env(name: str, default: float) -> float:
        raw = os.environ.get(f"RENDERHIVE_{name}")
        return float(raw) if raw else default
    return {"submit": RateLimiter(env("SUBMITS_PER_MINUTE", SUBMITS_PER_MINUTE), int(env("SUBMIT_BURST", SUBMIT_BURST))),
            "upload": RateLimiter(env("UPLOADS_PER_MINUTE", UPLOADS_PER_MINUTE), int(env("UPLOAD_BURST", UPLOAD_BURST)))}


def _too_often(kind: str, limiter: RateLimiter, wait: float) -> tuple[str, str]:
    """The 429's detail and its Retry-After (whole seconds, at least 1)."""
    what, advice = RATE_ADVICE[kind]
    retry = max(1, math.ceil(wait)) if math.isfinite(wait) else 3600
    detail = (f"too many {what}: {limiter.rate * 60:g} a minute are allowed, {limiter.burst} at once; try again "
              f"in {retry} s, and {advice}")
    return detail, str(retry)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _too_big(what: str, limit: int, size: str) -> str:
    if what.startswith(("PUT /api/blobs/", "PATCH /api/blobs/")):
        return (f"upload of {size} bytes exceeds the {limit} byte limit: reduce the scene (pack fewer or smaller "
                "textures)")
    return f"the body of {what} ({size} bytes) exceeds its {_human(limit)} limit: send less per request"


class Guard:
    """ASGI middleware: see the module docstring. ``engine`` finds users by token; ``blob_limit`` is the
    blob store's largest upload; the rate limits are read from the environment when the app is made."""

    def __init__(self, app, engine, blob_limit: int):
        self.app, self.engine, self.blob_limit = app, engine, blob_limit
        self.limiters = rate_limiters_from_env()

    async def __call__(self, scope, receive: Callable[[], Awaitable[dict]], send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = _limit(method, path, self.blob_limit)
        what = f"{method} {path}"
        user = None
        if path.startswith("/api/") and (method, path) not in OPEN:
            user = await self._user(headers)
            if user is None:
                return await _answer(send, 401, "missing or unknown API token: pass 'Authorization: Bearer "
                                                "<token>' (farm --token, or RENDERHIVE_TOKEN); the body was not read")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _answer(send, 400, f"Content-Length {declared[:40]!r} is not a number of bytes")
            if int(declared) > limit:
                return await _answer(send, 413, _too_big(what, limit, declared))
        kind = rate_kind(method, path)
        if kind is not None and user is not None:
            wait = self.limiters[kind].take(user)
            if wait > 0:
                detail, retry = _too_often(kind, self.limiters[kind], wait)
                return await _answer(send, 429, detail, [(b"retry-after", retry.encode())])
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
        except ClientDisconnect:  # the client left mid-body, or a body deadline cut it off (408 sent already):
            pass  # no one to answer, and not the app's error (uvicorn would log a traceback for each)

    async def _user(self, headers: dict[str, str]) -> int | None:
        """The id of the user whose token the request carries, or None."""
        token = auth.bearer_token(headers.get("authorization"))
        if not token or len(token) > 200:
            return None
        return await asyncio.to_thread(self._lookup, token)

    def _lookup(self, token: str) -> int | None:
        with new_session(self.engine) as s:
            user = auth.user_for_token(s, token)
            return None if user is None else user.id


async def _answer(send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
