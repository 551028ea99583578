"""HTTP client of the Renderhive API, standard library only (it must run inside Blender's Python).

Used by the CLI and the Blender add-on. Errors come back as :class:`ApiError` carrying the server's
explanation (``detail``) or, when the coordinator cannot be reached, what to check.

Uploads (whole PUTs, resumable PATCHes, batches of small files) send their head first and the body only
once the farm says go on (``Expect: 100-continue``), and wait out a 429/503 that says when to come back
(``Retry-After``), for at most ``RENDERHIVE_WAIT_LIMIT_S`` in all per upload; a body sent again is counted
once by progress. Nothing is lost by a wait: the farm refuses before it reads or stores any byte.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import select
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1 << 20
RESUMABLE_ABOVE = int(float(os.environ.get("RENDERHIVE_RESUMABLE_MIB", 64)) * (1 << 20))
"""Files of at least this many bytes are uploaded resumably (``RENDERHIVE_RESUMABLE_MIB``, 64 MiB): a dropped
connection costs only what was in flight. Smaller files go in one PUT (one request instead of two)."""
RESUME_ATTEMPTS = 5
"""Connections an upload may lose before it gives up (each resumes where the farm's copy ends)."""
WAIT_LIMIT_S = float(os.environ.get("RENDERHIVE_WAIT_LIMIT_S", 900))
"""Longest one upload waits, all its waits together, when the farm answers 429 (its per-user upload rate)
or 503 (too many connections) with a ``Retry-After`` (``RENDERHIVE_WAIT_LIMIT_S``, 15 minutes): a
2,000-file project at the default 600 a minute waits about 2 minutes in all, and a farm that keeps saying
no for longer gets a clear error instead of a client that hangs."""
WAIT_STATUSES = (429, 503)
BATCH_BELOW = int(float(os.environ.get("RENDERHIVE_BATCH_BELOW_KIB", 256)) * 1024)
"""Files smaller than this go in batches (:meth:`Client.upload_batch`, ``RENDERHIVE_BATCH_BELOW_KIB``,
256 KiB; 0: never): one request for many small textures, which the farm's upload rate counts once
(farm/web/api_blobs.py)."""
BATCH_BYTES, BATCH_FILES = 3 << 20, 100
"""Most bytes and files of one batch: under the farm's 4 MiB bound on such a body, and its 100 files."""


class ApiError(RuntimeError):
    def __init__(self, message: str, status: int = 0, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after   # seconds from the answer's Retry-After (429, 503), else None


def parse_wxh(text: str | None, option: str, example: str) -> tuple[int, int] | None:
    """A command line's ``WIDTHxHEIGHT`` (``x`` or ``×``), or None when not given; ApiError naming ``option``."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ApiError(f"{option} {text!r}: write WIDTHxHEIGHT, e.g. {example}") from None
    return w, h


def _retry_after(headers) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds; an HTTP date is not sent by the farm), or None."""
    raw = (headers.get("Retry-After") if headers is not None else None) or ""
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


SEND_BLOCK = 64 << 10
"""Bytes an upload reads from its file and sends at a time."""
CONTINUE_WAIT_S = 10.0
"""How long an upload waits for the farm's ``100 Continue`` (or its refusal) before it sends the body anyway."""


def _go_on(sock, wait: float = CONTINUE_WAIT_S) -> bool:
    """After an upload's head: True to send the body (``100 Continue`` came, and is consumed here; or nothing
    came within ``wait``), False when the farm's final answer came instead (left for ``getresponse``)."""
    deadline = time.monotonic() + wait
    seen = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return True
        seen = sock.recv(1024, socket.MSG_PEEK)
        if not seen:
            return False   # closed: getresponse reports it
        if len(seen) >= 12 and seen[9:12] != b"100":
            return False
        end = seen.find(b"\r\n\r\n")
        if len(seen) >= 12 and end >= 0:
            sock.recv(end + 4)   # the interim answer, exactly: what follows is the final one
            return True
        time.sleep(0.01)   # part of the status line so far


def _answer_error(method: str, path: str, code: int, reason: str, raw: bytes, headers) -> ApiError:
    """An ApiError carrying the farm's explanation (``detail``) of an error answer, and its Retry-After."""
    try:
        detail = json.loads(raw.decode() or "{}").get("detail", reason)
    except (ValueError, AttributeError):
        detail = reason
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return ApiError(f"{method} {path}: {detail} (HTTP {code})", code,
                    _retry_after(headers) if code in WAIT_STATUSES else None)


def wait_message(status: int, seconds: float) -> str:
    """What progress shows while the client waits out a 429/503."""
    if status == 429:
        return f"waiting {seconds:.0f} s for the farm's upload limit"
    return f"waiting {seconds:.0f} s: the farm is busy (too many connections)"


def file_sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


class _ProgressReader:
    """A file-like body that reports bytes as urllib reads them (upload progress), from ``offset`` on."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None, offset: int = 0):
        self.f = open(path, "rb")
        self.f.seek(offset)
        self.progress = progress
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(CHUNK if n is None or n < 0 else n)
        self.sent += len(data)
        if data and self.progress:
            self.progress(len(data))
        return data

    def close(self) -> None:
        self.f.close()


class Client:
    batch_below, batch_bytes, batch_files = BATCH_BELOW, BATCH_BYTES, BATCH_FILES

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0,
                 wait_limit: float | None = None, on_wait: Callable[[str], None] | None = None):
        self.url = (url or os.environ.get("RENDERHIVE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("RENDERHIVE_TOKEN", "")
        self.timeout = timeout
        self.wait_limit = WAIT_LIMIT_S if wait_limit is None else wait_limit
        self.on_wait = on_wait     # told wait_message(...) before each wait (the CLI's progress line)
        self.waited = 0.0          # seconds this client has waited out 429/503 answers, in all
        self.sleep = time.sleep

    # ------------------------------------------------------------------ plumbing
    def _open(self, method: str, path: str, body: Any = None, data: Any = None,
              headers: dict[str, str] | None = None):
        hdrs = {"Accept": "application/json", **(headers or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise _answer_error(method, path, exc.code, exc.reason, exc.read(), exc.headers) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise self._unreachable(getattr(exc, "reason", exc)) from None

    def _unreachable(self, reason: Any) -> ApiError:
        return ApiError(f"cannot reach the coordinator at {self.url} ({reason}): is `farm serve` running, "
                        "and is --url / RENDERHIVE_URL right?")

    def _send(self, method: str, path: str, data: Any, length: int) -> Any:
        """An upload's request (``data``: bytes, or a file-like read in CHUNKs), its JSON answer back.

        The head goes first with ``Expect: 100-continue`` and the body only once the farm says go on: the
        farm refuses (429 for its upload rate, 401, 413) before it reads a byte of a body and then closes
        the connection, so a body sent blind meets a reset instead of the answer (measured: 3 MB PUTs at
        a burst of 1 failed that way in 3 runs of 4) and the client could not wait out the 429. A server
        that says nothing within CONTINUE_WAIT_S gets the body anyway; over HTTPS the body is sent blind."""
        u = urllib.parse.urlsplit(self.url)
        https = u.scheme == "https"
        conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
            u.hostname, u.port, timeout=self.timeout)
        hdrs = {"Accept": "application/json", "Content-Type": "application/octet-stream",
                "Content-Length": str(length)}
        if not https:
            hdrs["Expect"] = "100-continue"
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        try:
            try:
                conn.putrequest(method, u.path.rstrip("/") + path, skip_accept_encoding=True)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                conn.endheaders()
                if https or _go_on(conn.sock):
                    read = (io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data).read
                    for block in iter(lambda: read(SEND_BLOCK), b""):   # a local read error ends it all
                        try:
                            conn.send(block)
                        except OSError:   # cut off mid-body: the farm may have said why before it closed
                            break
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from None
            if resp.status >= 400:
                raise _answer_error(method, path, resp.status, resp.reason, raw, resp.headers)
            return json.loads(raw) if raw else None
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body=body) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def patiently(self, call: Callable[[], Any]) -> Any:
        """``call()``, again after each 429/503 answer that says when to come back (``Retry-After``), for at
        most ``wait_limit`` seconds of waiting in all; the farm refuses those before reading the body, so
        sending it again is safe and loses nothing."""
        waited = 0.0
        while True:
            try:
                return call()
            except ApiError as exc:
                if exc.status not in WAIT_STATUSES or exc.retry_after is None:
                    raise
                wait = max(exc.retry_after, 0.05)
                if waited + wait > self.wait_limit:
                    raise ApiError(f"{exc}; gave up after waiting {waited:.0f} s (the most this client waits is "
                                   f"{self.wait_limit:g} s, RENDERHIVE_WAIT_LIMIT_S): submit again later, it "
                                   "uploads only what the farm still lacks", exc.status, exc.retry_after) from None
                if self.on_wait:
                    self.on_wait(wait_message(exc.status, wait))
                self.sleep(wait)
                waited += wait
                self.waited += wait

    # ------------------------------------------------------------------ API
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/api/health")

    def create_user(self, name: str, credit_line: bool = False) -> dict[str, Any]:
        return self.request("POST", "/api/users", {"name": name, "credit_line": credit_line})

    def set_credit_line(self, name: str, credit_line: bool) -> dict[str, Any]:
        return self.request("PUT", f"/api/users/{quote(name, safe='')}/credit", {"credit_line": credit_line})

    def missing(self, hashes: list[str]) -> list[str]:
        return self.patiently(lambda: self.request("POST", "/api/blobs/missing", {"hashes": hashes}))["missing"]

    def upload_blob(self, path: Path, sha: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """PUT blob ``sha`` whole, waiting out the farm's upload rate (429) and connection limit (503).
        ``progress`` gets each byte once, however many times the body had to be sent."""
        size = Path(path).stat().st_size
        shown = 0

        def put() -> dict[str, Any]:
            def tick(n: int) -> None:
                nonlocal shown
                if progress and reader.sent > shown:
                    progress(reader.sent - shown)
                    shown = reader.sent
            reader = _ProgressReader(Path(path), tick)
            try:
                return self._send("PUT", f"/api/blobs/{sha}", reader, size)
            finally:
                reader.close()
        return self.patiently(put)

    def upload_batch(self, items: list[tuple[str, Path]],
                     progress: Callable[[Path, int], None] | None = None) -> dict[str, Any]:
        """POST small blobs (sha256, path) in one request (at most BATCH_FILES, BATCH_BYTES in all: the caller
        groups them), waiting out 429/503. ``progress(path, bytes)`` once per file when the farm has them.
        Returns {"stored": [sha, ...], "had": n, "bytes": n}; ApiError 404/405 from a farm without batches."""
        datas = [Path(path).read_bytes() for _, path in items]
        head = json.dumps({"blobs": [[sha, len(d)] for (sha, _), d in zip(items, datas)]}).encode()
        body = head + b"\n" + b"".join(datas)

        def post() -> dict[str, Any]:
            return self._send("POST", "/api/blobs/batch", body, len(body))
        done = self.patiently(post)
        if progress:
            for (_, path), d in zip(items, datas):
                progress(Path(path), len(d))
        return done

    def upload_standing(self, sha: str) -> dict[str, Any]:
        """Where this user's resumable upload of ``sha`` stands: {"offset", "size", "complete"}."""
        return self.patiently(lambda: self.request("GET", f"/api/blobs/{sha}/upload"))

    def upload_resumable(self, path: Path, sha: str, progress: Callable[[int], None] | None = None,
                         attempts: int = RESUME_ATTEMPTS, pause: float = 1.0) -> int:
        """Upload blob ``sha`` from ``path`` from where the farm's partial copy ends, resuming after a dropped
        connection (at most ``attempts`` times); the farm checks the hash of the whole. ``progress`` gets the
        bytes the farm has, sent now or before. Returns the bytes sent by this call."""
        path = Path(path)
        size = path.stat().st_size
        try:
            at = self.upload_standing(sha)
        except ApiError as exc:
            if exc.status in (404, 405):   # a coordinator without resumable uploads: one PUT
                self.upload_blob(path, sha, progress)
                return size
            raise
        if at["complete"]:
            return 0
        if at["size"] not in (None, size):   # begun for another file size: cannot be this file
            self.request("DELETE", f"/api/blobs/{sha}/upload")
            at = {"offset": 0}
        sent, shown = 0, 0
        for attempt in range(attempts):
            offset = at["offset"]
            if progress and offset > shown:
                progress(offset - shown)
                shown = offset
            reader = _ProgressReader(path, None, offset)
            if progress:
                def tick(n: int) -> None:
                    nonlocal shown
                    if reader.sent + offset > shown:
                        progress(min(n, reader.sent + offset - shown))
                        shown = reader.sent + offset
                reader.progress = tick
            def patch() -> dict[str, Any]:
                reader.f.seek(offset)   # sent again after a 429/503: the farm read none of it
                reader.sent = 0
                return self._send("PATCH", f"/api/blobs/{sha}/upload?offset={offset}&size={size}", reader,
                                  size - offset)
            try:
                done = self.patiently(patch)
                sent += reader.sent
                if done["complete"]:
                    return sent
                at = done
                continue
            except ApiError as exc:
                sent += reader.sent
                if exc.status == 422 and "discarded" in str(exc):
                    raise ApiError(f"upload of {path.name}: {exc}", exc.status) from None
                if exc.status not in (0, 408, 409, 500, 502, 503, 504) or attempt == attempts - 1:
                    raise
            finally:
                reader.close()
            time.sleep(pause * (attempt + 1))
            at = self.upload_standing(sha)   # where the farm's copy ends now: resume from there
            if at["complete"]:
                return sent
        raise ApiError(f"upload of {path.name} did not finish after {attempts} attempts: run the submit again "
                       "(it resumes where the farm's copy ends)")

    def upload_any(self, path: Path, sha: str, progress: Callable[[int], None] | None = None,
                   resumable_above: int | None = None) -> int:
        """Upload blob ``sha``: resumably from ``resumable_above`` bytes (default RESUMABLE_ABOVE), else one PUT.
        Returns the bytes sent."""
        size = Path(path).stat().st_size
        if size >= (RESUMABLE_ABOVE if resumable_above is None else resumable_above):
            return self.upload_resumable(path, sha, progress)
        self.upload_blob(Path(path), sha, progress)
        return size

    def upload_if_missing(self, path: Path, progress: Callable[[int], None] | None = None,
                          sha: str | None = None) -> tuple[str, int]:
        """Upload ``path`` unless the coordinator has it. Returns (sha256, bytes uploaded)."""
        sha = sha or file_sha256(Path(path))
        if sha not in self.missing([sha]):
            return sha, 0
        self.upload_blob(Path(path), sha, progress)
        return sha, Path(path).stat().st_size

    def submit(self, **job: Any) -> dict[str, Any]:
        return self.request("POST", "/api/jobs", job)

    def submit_diffusion(self, **job: Any) -> dict[str, Any]:
        """A Stable Diffusion job (see DiffusionJobCreate in farm/web/schemas.py); None values take the defaults."""
        return self.request("POST", "/api/jobs/diffusion", {k: v for k, v in job.items() if v is not None})

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", "/api/jobs" + (f"?status={status}" if status else ""))

    def job(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{int(job_id)}")

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/api/jobs/{int(job_id)}/cancel")

    def outputs(self, job_id: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/jobs/{int(job_id)}/outputs")

    def workers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/workers")

    def worker_reputation(self, worker_id: str, limit: int = 100) -> dict[str, Any]:
        """A worker's standing and the evidence behind it (newest first)."""
        return self.request("GET", f"/api/workers/{urllib.parse.quote(worker_id, safe='')}/reputation?limit={limit}")

    def allow_worker(self, key: str) -> dict[str, Any]:
        """(admin) Admit a worker's public key (Z85): it joins the allow-list, and leaves the revocations."""
        return self.request("POST", "/api/workers/allow", {"worker": key})

    def revoke_worker(self, key_or_worker_id: str) -> dict[str, Any]:
        """(admin) Refuse a worker's key from now on (by the key, or the id it holds): its connections are
        dropped and their leases requeued."""
        return self.request("POST", "/api/workers/revoke", {"worker": key_or_worker_id})

    # ------------------------------------------------------------------ review and payments
    def estimate(self, **req: Any) -> dict[str, Any]:
        return self.request("POST", "/api/estimate", {k: v for k, v in req.items() if v is not None})

    def approve(self, job_id: int) -> dict[str, Any]:
        return self.request("POST", f"/api/jobs/{int(job_id)}/approve")

    def reject(self, job_id: int, frames: str | list[int], reason: str = "") -> dict[str, Any]:
        return self.request("POST", f"/api/jobs/{int(job_id)}/reject", {"frames": frames, "reason": reason})

    def payment(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{int(job_id)}/payment")

    def payouts(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{int(job_id)}/payouts")

    def my_wallet(self) -> dict[str, Any]:
        return self.request("GET", "/api/wallet")

    def wallet(self, address: str) -> dict[str, Any]:
        return self.request("GET", f"/api/wallets/{address}")

    def withdraw(self, address: str) -> dict[str, Any]:
        return self.request("POST", f"/api/wallets/{address}/withdraw")

    def download_output(self, job_id: int, name: str, dest: Path) -> Path:
        """Download one output to ``dest`` (written to a temporary name, then renamed)."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".part")
        with self._open("GET", f"/api/jobs/{int(job_id)}/outputs/{urllib.request.quote(name)}") as resp, \
                open(tmp, "wb") as f:
            for block in iter(lambda: resp.read(CHUNK), b""):
                f.write(block)
        os.replace(tmp, dest)
        return dest

    def download_results(self, job_id: int, out_dir: Path,
                         progress: Callable[[str], None] | None = None) -> list[Path]:
        """Download every output not already present with the right hash. Returns the local paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for o in self.outputs(job_id):
            name = Path(o["name"]).name  # never trust a path from the network
            dest = out_dir / name
            if not (dest.exists() and file_sha256(dest) == o["sha256"]):
                self.download_output(job_id, o["name"], dest)
                if file_sha256(dest) != o["sha256"]:
                    dest.unlink()
                    raise ApiError(f"{name} arrived corrupted (hash mismatch): run the download again")
            paths.append(dest)
            if progress:
                progress(name)
        return paths

    def follow(self, job_id: int) -> Iterator[dict[str, Any]]:
        """Job views from the server-sent event stream until the job is rendered or final."""
        with self._open("GET", f"/api/jobs/{int(job_id)}/events", headers={"Accept": "text/event-stream"}) as resp:
            data = []
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    data.append(line[6:])
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []
