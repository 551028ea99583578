"""CurveZMQ on the worker plane: key files, admission (open | token | allowlist), the ZAP handler, and the
gate that keeps every message of a key not admitted away from the coordinator.

Every worker connection is encrypted and authenticated with CURVE (ZeroMQ RFC 26). The coordinator has a
long-term keypair, made on first start: ``DATA/curve/server.key`` (public) and ``server.key_secret``,
pyzmq certificate files (``zmq.auth.load_certificate`` reads them), mode 600 in a 700 directory. A worker
has its own (``CACHE/curve/worker.key``, :mod:`worker.keys`) and pins the coordinator's public key
(``farm worker --server-key``): with any other key the handshake fails and nothing is sent in clear.

Admission (``farm serve --admit``; ``auto``, the default, is ``open`` on a loopback bind, ``token`` on
any other, so a farm reachable from the network is never open by accident):

* ``allowlist``: only keys listed in ``DATA/curve/allowed`` (one Z85 key a line, first on it; anything
  after the key and lines that hold no key are comments, kept on rewrites;
  ``farm workers allow|revoke`` or an edit of the file, reloaded when it changes). The ZAP handler refuses
  any other key during the handshake, so its messages never exist for the application.
* ``token``: keys on that list, and keys that present the farm's enrollment token
  (``DATA/curve/enroll.token``) in their HELLO: the key is then added to the list. A CURVE ZAP request
  carries nothing but the client's key, so the handshake admits any key not revoked, and the
  :class:`Gate` passes a connection's messages to the coordinator only once its key is on the list;
  anything else from it is answered with DISCONNECT and dropped.
* ``open``: any key not revoked (still encrypted and bound to its ids; anyone reaching the port can work).

Revoking a key (``farm workers revoke KEY|WORKER``) moves it from the list to ``DATA/curve/revoked``: its
connections get DISCONNECT and their leases are requeued at once (:func:`expel`); the ZAP handler refuses
its reconnects in every mode, and the gate drops whatever it still sends on a connection already open.
Refusals are logged with the key (at most once per CURVE_REFUSAL_LOG_INTERVAL per key).

A worker id belongs to the first key that said HELLO with it (``DATA/curve/workers``, a JSON map): a HELLO
with that id from another key is refused, so one worker cannot take over another's id and leases.
Revoking the key frees its ids. Threads: the keyring and the gate live on the event loop's thread;
:func:`expel` runs on the coordinator's thread (it reads the gate's map of connections, never writes it).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from common import protocol as P
from common.keys import KeyFileError, is_key, load_or_create_keypair, private_dir, write_private
from farm import constants as C

log = logging.getLogger("farm.plane.gate")

MODES = ("open", "token", "allowlist")
ZAP_DOMAIN = "renderhive"
TOKEN_PREFIX = "rhe_"


def resolve_mode(admit: str, bind: str) -> str:
    """``--admit``: ``auto`` is ``open`` for a loopback (or ipc/inproc) endpoint, ``token`` otherwise."""
    if admit in MODES:
        return admit
    if admit != "auto":
        raise ValueError(f"--admit {admit!r}: choose auto, {', '.join(MODES)}")
    url = urlsplit(bind)
    if url.scheme in ("ipc", "inproc"):
        return "open"
    host = url.netloc.rsplit(":", 1)[0].strip("[]")
    try:
        return "open" if host == "localhost" or ipaddress.ip_address(host).is_loopback else "token"
    except ValueError:  # "*", an interface or host name: reachable from elsewhere
        return "token"


# ------------------------------------------------------------------ the coordinator's keyring
def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino
    except FileNotFoundError:
        return None


class Keyring:
    """The coordinator's keypair, admission mode, allow-list, revocations, enrollment token and id
    bindings, all under ``DATA/curve``. Event loop thread only (expel reads ``keys_of``/``bound`` copies)."""

    def __init__(self, data_dir: Path, mode: str, clock=time.monotonic):
        if mode not in MODES:
            raise ValueError(f"admission mode {mode!r}: choose one of {', '.join(MODES)}")
        self.dir = private_dir(Path(data_dir) / "curve")
        self.public, self.secret = load_or_create_keypair(self.dir, "server", "Renderhive coordinator")
        self.mode = mode
        self.clock = clock
        self.allowed_file, self.revoked_file = self.dir / "allowed", self.dir / "revoked"
        self.token_file, self.bindings_file = self.dir / "enroll.token", self.dir / "workers"
        self.token = self._load_or_create_token()
        self.allowed: set[str] = set()
        self.revoked: set[str] = set()
        self.bindings: dict[str, str] = self._load_bindings()  # worker id → the key it belongs to
        self._stamps: dict[Path, tuple | None] = {}
        self._refusals: dict[str, tuple[float, int]] = {}  # key → (last logged, refusals since)
        self.refresh()

    @property
    def server_key(self) -> str:
        return self.public.decode()

    def _load_or_create_token(self) -> str:
        lines = [ln.strip() for ln in _read_lines(self.token_file) if ln.strip() and not ln.startswith("#")]
        if lines:
            return lines[0]
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        write_private(self.token_file, token + "\n")
        return token

    def _load_bindings(self) -> dict[str, str]:
        try:
            data = json.loads(self.bindings_file.read_text() or "{}")
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise KeyFileError(f"{self.bindings_file} is not valid JSON ({exc}): fix or delete it (deleting "
                               "lets any admitted key claim any worker id once more)") from None
        return {str(k): str(v) for k, v in data.items() if is_key(v)}

    # ---------------------------------------------------------------- files
    def _keys_in(self, path: Path) -> set[str]:
        keys = set()
        for n, line in enumerate(_read_lines(path), 1):
            word = (line.split() or [""])[0]  # not split at "#": Z85 keys may hold one
            if is_key(word):
                keys.add(word)
            elif word and not word.startswith("#"):
                log.warning("%s line %d: %r is not a Z85 public key (40 characters); ignored", path, n, word[:60])
        return keys

    def refresh(self) -> set[str]:
        """Reload the allow-list and the revocations if their files changed (two stat calls; the broker
        calls this every heartbeat interval). Returns the keys admitted before and not any more: the
        caller expels them."""
        stamps = {p: _stamp(p) for p in (self.allowed_file, self.revoked_file)}
        if stamps == self._stamps:
            return set()
        first = not self._stamps
        old_allowed, old_revoked = self.allowed, self.revoked
        self._stamps = stamps
        self.allowed, self.revoked = self._keys_in(self.allowed_file), self._keys_in(self.revoked_file)
        if first:
            return set()
        gone = (self.revoked - old_revoked) | (old_allowed - self.allowed if self.mode != "open" else set())
        if gone:
            log.warning("keys no longer admitted after an edit of %s: %s", self.dir, ", ".join(sorted(gone)))
        return gone

    def _edit(self, path: Path, drop: set[str], add: list[str]) -> None:
        """Rewrite ``path`` without the lines of the keys in ``drop`` and with ``add`` appended; other
        lines (the operator's comments) stay as they were."""
        keep = [ln for ln in _read_lines(path) if (ln.split() or [""])[0] not in drop]
        write_private(path, "\n".join(keep + add) + "\n")
        self._stamps[path] = _stamp(path)

    def allow(self, key: str, note: str = "allowed") -> bool:
        """Put ``key`` on the allow-list (and off the revocations). Returns False if it was there already."""
        if key in self.allowed and key not in self.revoked:
            return False
        if key in self.revoked:
            self._edit(self.revoked_file, {key}, [])
            self.revoked.discard(key)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._edit(self.allowed_file, {key}, [f"{key}  # {note} {stamp}"])
        self.allowed.add(key)
        return True

    def revoke(self, key: str) -> None:
        """Take ``key`` off the allow-list and refuse it from now on, in every mode."""
        self._edit(self.allowed_file, {key}, [])
        self._edit(self.revoked_file, {key}, [f"{key}  # revoked {time.strftime('%Y-%m-%d %H:%M:%S')}"])
        self.allowed.discard(key)
        self.revoked.add(key)
        self.unbind(key)

    def bind(self, worker_id: str, key: str) -> str | None:
        """Claim ``worker_id`` for ``key``. Returns why it may not (another key holds it), or None."""
        held = self.bindings.get(worker_id)
        if held == key or not 1 <= len(worker_id) <= 100:  # the coordinator refuses such an id itself
            return None
        if held is not None:
            return (f"worker id {worker_id!r} belongs to another worker key: give this worker another "
                    "--worker-id, or have the farm's operator revoke the old key (farm workers revoke)")
        mine = sum(1 for k in self.bindings.values() if k == key)
        if mine >= C.MAX_WORKER_IDS_PER_KEY:  # one key cannot mint worker rows without end
            return (f"this worker key holds {mine} worker ids already, the most one key may: reuse one of them "
                    "(--worker-id), or give each machine its own key (its own cache folder)")
        self.bindings[worker_id] = key
        write_private(self.bindings_file, json.dumps(self.bindings, indent=1, sort_keys=True) + "\n")
        return None

    def unbind(self, key: str) -> list[str]:
        ids = [w for w, k in self.bindings.items() if k == key]
        if ids:
            for w in ids:
                del self.bindings[w]
            write_private(self.bindings_file, json.dumps(self.bindings, indent=1, sort_keys=True) + "\n")
        return ids

    # ---------------------------------------------------------------- decisions
    def admits_handshake(self, key: str) -> tuple[bool, str]:
        """The ZAP decision (the key is all a CURVE handshake tells): (admitted, why not)."""
        if key in self.revoked:
            return False, "the key was revoked"
        if self.mode == "allowlist" and key not in self.allowed:
            return False, "the key is not on the allow-list"
        return True, ""

    def admits_message(self, key: str) -> bool:
        """Whether a message of an established connection with ``key`` may reach the coordinator."""
        return key not in self.revoked and (self.mode == "open" or key in self.allowed)

    def token_ok(self, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self.token.encode())

    def note_refusal(self, key: str, why: str, peer: str = "") -> None:
        """Log a refused key, at most once per CURVE_REFUSAL_LOG_INTERVAL per key (a refused peer retries)."""
        now = self.clock()
        last, count = self._refusals.get(key, (float("-inf"), 0))
        if now - last < C.CURVE_REFUSAL_LOG_INTERVAL:
            self._refusals[key] = (last, count + 1)
            return
        if len(self._refusals) > 10000:  # a flood of throw-away keys must not grow this without bound
            self._refusals.clear()
        self._refusals[key] = (now, 0)
        more = f" ({count} more refusals since last logged)" if count else ""
        log.warning("refused worker key %s%s: %s%s", key, f" from {peer}" if peer else "", why, more)


class AddressBudget:
    """A token bucket per network address (at most 4,096 addresses remembered, least recent forgotten)."""

    def __init__(self, per_minute: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = per_minute / 60.0, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, address: str) -> bool:
        now = self.clock()
        tokens, at = self.buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1
        self.buckets[address] = (tokens - 1 if ok else tokens, now)  # re-inserted: most recent last
        if len(self.buckets) > 4096:
            del self.buckets[next(iter(self.buckets))]
        return ok


# ------------------------------------------------------------------ the ZAP handler
class ZapHandler(AsyncioAuthenticator):
    """pyzmq's asyncio ZAP authenticator with the keyring as its CURVE credentials provider. The ZAP
    User-Id of an admitted connection is its public key in Z85 (pyzmq's default), which the broker reads
    off every message it receives."""

    def __init__(self, context: zmq.Context, keyring: Keyring):
        super().__init__(context, log=logging.getLogger("farm.plane.gate.zap"))
        self.keyring = keyring
        self._peer = ""
        # connections that are not (yet) workers cost a socket each: an address may open only so many a minute
        self.handshakes = AddressBudget(C.HANDSHAKES_PER_MINUTE, C.HANDSHAKE_BURST)
        self.configure_curve_callback(ZAP_DOMAIN, self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._peer = msg[3].decode("utf-8", "replace")[:100] if len(msg) > 3 else ""  # the peer's address
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        k = key.decode("ascii", "replace")
        if not self.handshakes.take(self._peer):  # the ZAP request's address: the peer's IP
            self.keyring.note_refusal(k, "too many handshakes from this address; wait and retry", self._peer)
            return False
        ok, why = self.keyring.admits_handshake(k)
        if not ok:
            self.keyring.note_refusal(k, f"{why}; handshake refused", self._peer)
        return ok


def secure_server(sock: zmq.Socket, keyring: Keyring) -> None:
    """Make ``sock`` (not yet bound) a CURVE server whose handshakes the ZAP handler decides."""
    sock.curve_secretkey = keyring.secret
    sock.curve_publickey = keyring.public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


# ------------------------------------------------------------------ the per-message gate
class Gate:
    """Checks the CURVE key of every message the broker received (the ZAP User-Id on its routing-id
    frame) before the coordinator sees it: enrolls keys that present the token (token mode), holds each
    worker id to its key, and remembers which key each connection has (for :func:`expel`). Refusals are
    queued in ``out`` as DISCONNECT replies."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring
        self.peer_keys: dict[bytes, str] = {}  # ROUTER routing id → the key of that connection
        self.out: list[tuple[bytes, Any]] = []

    def admit(self, frames: list[bytes], key: str | None) -> bool:
        ident, kr = frames[0], self.keyring
        if not key:  # no CURVE User-Id: impossible on a CURVE server socket, dropped all the same
            return False
        hello = P.decode_hello(frames[1:])  # None unless a well-formed HELLO
        if kr.admits_message(key):
            why = kr.bind(hello.worker_id, key) if hello else None
        elif key in kr.revoked:
            why = "this worker's key was revoked by the farm's operator"
        elif kr.mode == "token" and hello and kr.token_ok(hello.enroll_token):
            why = kr.bind(hello.worker_id, key)
            if why is None:
                kr.allow(key, f"enrolled with the token by worker {hello.worker_id[:100]}")
                log.info("worker %s enrolled its key %s with the enrollment token", hello.worker_id, key)
        elif kr.mode == "token":
            how = ("its HELLO carried a wrong enrollment token" if hello and hello.enroll_token else
                   "a new key must first say HELLO with the farm's enrollment token")
            why = (f"this worker's key is not enrolled: {how}; start the worker with --enroll-token (the "
                   "coordinator's DATA/curve/enroll.token)")
        else:
            why = (f"this worker's key {key} is not on the farm's allow-list: ask its operator to run "
                   f"`farm workers allow '{key}'`")
        if why is None:
            self.peer_keys[ident] = key
            return True
        kr.note_refusal(key, why)
        self.out.append((ident, P.Disconnect(why)))
        return False

    def prune(self, live) -> None:
        """Forget connections the coordinator does not know (gone, or never said HELLO)."""
        for ident in [i for i in self.peer_keys if i not in live]:
            del self.peer_keys[ident]


# ------------------------------------------------------------------ revocation (coordinator thread)
def expel(coord, gate: Gate, keys: set[str], worker_ids: set[str], reason: str) -> dict[str, Any]:
    """Drop every connection of ``keys`` (DISCONNECT) and requeue every lease of those connections' workers
    and of ``worker_ids`` (the ids the keys held; offline ones keep leases until they expire otherwise).
    Runs on the coordinator's thread; the replies leave with the next step. Returns what it did."""
    from sqlmodel import select  # here, not above: worker.keys imports this module, the daemon needs no database

    from farm.store.db import session as new_session
    from farm.store.models import Task
    from farm.store.states import TASK_LEASED
    leased_states = [s.value for s in TASK_LEASED]
    now = coord.clock()
    out: list[tuple[bytes, Any]] = []
    idents = [i for i, k in list(gate.peer_keys.items()) if k in keys]
    ids = set(worker_ids) | {coord.conns[i].worker_id for i in idents if i in coord.conns}
    with new_session(coord.engine) as s:
        leased = list(s.exec(select(Task).where(Task.worker_id.in_(ids)).where(Task.status.in_(leased_states))))
        requeued = [(t.id, t.attempt) for t in leased]
        for ident in idents:
            conn = coord.conns.get(ident)
            if conn is not None:
                coord._drop(s, conn, now, reason, out)  # requeues the leases it holds
            out.append((ident, P.Disconnect(reason)))
        for task in s.exec(select(Task).where(Task.worker_id.in_(ids)).where(Task.status.in_(leased_states))):
            coord.failures.lose(s, task, now, reason, out)  # a worker of the key that is offline right now
        s.commit()
    coord.pending.extend(out)
    coord.want_assign = True
    for key in keys:
        log.warning("expelled key %s: %s (%d connections, workers %s, %d leases requeued)", key, reason,
                    len(idents), ", ".join(sorted(ids)) or "none", len(requeued))
    return {"connections": len(idents), "workers": sorted(ids), "leases_requeued": len(requeued)}
