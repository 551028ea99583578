"""The worker-plane wire protocol: the only module that touches raw ZeroMQ frames.

A message is three frames: ``[PROTOCOL_HEADER, command byte, msgpack body]`` (the ROUTER side sees the
peer's routing id in front). Every message is a frozen dataclass; :func:`encode` turns one into frames and
:func:`decode` turns frames back into one, raising :class:`ProtocolError` on anything malformed: a wrong
version, an unknown command, a body that is not a msgpack map, a missing or extra field, a field of the
wrong type, or a body larger than :data:`~common.limits.MAX_MESSAGE_BYTES` (a BLOB's: larger than
:data:`~common.limits.MAX_BLOB_MESSAGE_BYTES`, its chunks being bigger). See PROTOCOL.md.

Every value a message carries may end up in a database row or a JSON column, so decoding accepts only what
those can hold: integers within int64, finite floats, strings without NUL characters (PostgreSQL text
refuses them), and for fields typed ``Any`` (specs, capabilities, outputs) JSON-like values only (no bytes, no extension types, string map keys) nested at most
:data:`MAX_NESTING` deep. Anything else is a ProtocolError here, not a failed commit later.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from common.limits import MAX_BLOB_MESSAGE_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_HEADER


class ProtocolError(ValueError):
    """A frame sequence that is not a valid message of this protocol version."""


MAX_NESTING = 32
"""Deepest nesting of lists and maps inside an ``Any`` field (a spec or capabilities map needs about 4;
about 1,000 levels would make ``json.dumps`` of the column fail with a RecursionError)."""


# ---------------------------------------------------------------- worker → coordinator
@dataclass(frozen=True)
class Hello:
    """First message on a fresh socket. ``running`` lists [task_id, attempt] pairs the worker still holds;
    ``enroll_token`` is the farm's enrollment token, which admits a new key on a farm in token mode
    (farm.plane.gate; the channel is encrypted to the coordinator's pinned key before anything is sent)."""
    command: ClassVar[int] = 0x01
    worker_id: str
    wallet: str
    slots: int
    capabilities: dict[str, Any]
    running: list[list[int]] = field(default_factory=list)
    version: str = "0.1.0"
    enroll_token: str = ""


@dataclass(frozen=True)
class Ready:
    """The worker can take ``free_slots`` more tasks."""
    command: ClassVar[int] = 0x02
    free_slots: int


@dataclass(frozen=True)
class Heartbeat:
    """Sent both ways every HEARTBEAT_INTERVAL. From a worker, ``running`` renews those leases."""
    command: ClassVar[int] = 0x03
    running: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units (frames, tiles, images) of a task are finished."""
    command: ClassVar[int] = 0x04
    task_id: int
    attempt: int
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Result:
    """The task is finished; every output blob was uploaded before this message is sent.

    ``outputs`` holds maps ``{"name": str, "sha256": str, "size": int, "frame": int}``."""
    command: ClassVar[int] = 0x05
    task_id: int
    attempt: int
    outputs: list[dict[str, Any]]
    render_seconds: float


@dataclass(frozen=True)
class Failed:
    """The task could not be done. ``retryable`` is False for faults of the scene, not of the worker."""
    command: ClassVar[int] = 0x06
    task_id: int
    attempt: int
    reason: str
    retryable: bool


@dataclass(frozen=True)
class BlobGet:
    """Request one chunk of a blob (credit-based: a worker keeps at most WELCOME's ``credit`` requests of
    its ``chunk_size`` open a blob). A longer ``length`` is served as one chunk."""
    command: ClassVar[int] = 0x07
    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class BlobPut:
    """One chunk of an output blob, written at ``offset`` of ``total`` bytes (at most UPLOAD_CHUNK_SIZE)."""
    command: ClassVar[int] = 0x08
    sha256: str
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True)
class Bye:
    """The worker is leaving; its leases are requeued at once."""
    command: ClassVar[int] = 0x09
    reason: str = ""


@dataclass(frozen=True)
class Release:
    """The worker hands the lease (task_id, attempt) back without fault: its owner's schedule or idle rule
    paused it (``farm worker --schedule/--idle-only``). The task is requeued at once; answered with ACK.
    Costs the worker no reputation and the task none of its attempts (up to the hard cap)."""
    command: ClassVar[int] = 0x0A
    task_id: int
    attempt: int
    reason: str = ""


@dataclass(frozen=True)
class TicketGet:
    """Ask for a ticket of the sealed blob channel (:mod:`common.sealed`) for blob ``sha256``, an input of
    a lease this worker holds: answered with TICKET. A worker sends it with its first BLOB_GET of a blob
    (no round trip is added) and fetches a big blob by HTTP with it; an older coordinator answers ERROR."""
    command: ClassVar[int] = 0x0B
    sha256: str


# ---------------------------------------------------------------- coordinator → worker
@dataclass(frozen=True)
class Welcome:
    """Answer to HELLO: the worker is registered; timing parameters it must follow. ``chunk_size`` and
    ``credit``: the BLOB chunk this coordinator serves and how many a worker keeps asked for (a worker
    fetches with these, so old and new coordinators, 256 KiB and 1 MiB chunks, both serve it)."""
    command: ClassVar[int] = 0x21
    worker_id: str
    heartbeat_interval: float
    liveness: int
    chunk_size: int
    credit: int


@dataclass(frozen=True)
class Task:
    """A lease on one task. ``lease_seconds`` counts from receipt; heartbeats that list it renew it."""
    command: ClassVar[int] = 0x22
    task_id: int
    attempt: int
    job_id: int
    lease_seconds: float
    kind: str
    spec: dict[str, Any]
    inputs: list[str]


@dataclass(frozen=True)
class Cancel:
    """Stop working on (task_id, attempt) now and discard its outputs."""
    command: ClassVar[int] = 0x23
    task_id: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class Blob:
    """One chunk of a blob, or ``error`` when the blob does not exist."""
    command: ClassVar[int] = 0x24
    sha256: str
    offset: int
    total: int
    data: bytes
    error: str = ""


@dataclass(frozen=True)
class BlobAck:
    """Bytes of an upload stored so far (the next offset expected); ``done`` once verified by hash."""
    command: ClassVar[int] = 0x25
    sha256: str
    offset: int
    done: bool
    error: str = ""


@dataclass(frozen=True)
class Ack:
    """Answer to RESULT and FAILED: the worker may forget the task. ``accepted`` is False for a stale
    (task, attempt): the work is discarded, never paid."""
    command: ClassVar[int] = 0x26
    task_id: int
    attempt: int
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class Disconnect:
    """Close this socket and reconnect with a fresh one (then HELLO again)."""
    command: ClassVar[int] = 0x27
    reason: str


@dataclass(frozen=True)
class Error:
    """The last message could not be understood; ``reason`` says why and what to do."""
    command: ClassVar[int] = 0x28
    reason: str


@dataclass(frozen=True)
class Price:
    """What the farm pays now, sent after WELCOME (and again should it change): ``tokens_per_unit`` (a
    decimal string) per ``unit`` of measured work; ``note`` says why nothing is paid (payments off)."""
    command: ClassVar[int] = 0x29
    tokens_per_unit: str
    unit: str
    note: str = ""


@dataclass(frozen=True)
class Earned:
    """The worker's share of job ``job_id`` was credited (the creator approved its payout list): ``amount``
    in the token's smallest unit and ``tokens``, both decimal strings (wei overflow int64), for
    ``work_seconds`` of measured work in ``tasks`` tasks plus ``check_seconds`` in ``checks`` spot checks, at
    ``tokens_per_unit``. Sent when it is credited, and again after HELLO for recent jobs (the worker
    prints each job once)."""
    command: ClassVar[int] = 0x2A
    job_id: int
    amount: str
    tokens: str
    work_seconds: float
    tasks: int
    check_seconds: float = 0.0
    checks: int = 0
    tokens_per_unit: str = ""


@dataclass(frozen=True)
class Ticket:
    """Answer to TICKET_GET: blob ``sha256`` (``total`` bytes) may be downloaded sealed from the
    coordinator's host at ``port`` with ``GET /sealed/<ticket>``, its records opened with ``key`` (32
    bytes, AES-256-GCM). ``digest``: the BLAKE3 digest (32 bytes) of the blob, taken by the coordinator as it
    sealed the blob after checking its sha256, to check the download against (empty while the blob is
    being sealed: ask again when the download ends). ``error``: why not (a small blob, no sealed server, not an input of a
    lease of yours): fetch it with BLOB_GET."""
    command: ClassVar[int] = 0x2B
    sha256: str
    ticket: str
    key: bytes
    total: int
    port: int
    error: str = ""
    digest: bytes = b""


WORKER_MESSAGES = (Hello, Ready, Heartbeat, Progress, Result, Failed, BlobGet, BlobPut, Bye, Release, TicketGet)
COORDINATOR_MESSAGES = (Welcome, Task, Heartbeat, Cancel, Blob, BlobAck, Ack, Disconnect, Error, Price, Earned,
                        Ticket)
MESSAGES: dict[int, type] = {cls.command: cls for cls in WORKER_MESSAGES + COORDINATOR_MESSAGES}
Message = Any  # any of the dataclasses above


# ---------------------------------------------------------------- type checking of decoded bodies
def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """``value`` of an ``Any`` field must be JSON-like: it is stored in JSON columns."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check(value, str, where)
    elif isinstance(value, int):
        _check(value, int, where)
    elif isinstance(value, float):
        _check(value, float, where)
    elif isinstance(value, (list, dict)):
        if depth >= MAX_NESTING:
            raise ProtocolError(f"{where}: nested more than {MAX_NESTING} levels deep")
        for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
            if isinstance(value, dict):
                if not isinstance(k, str):
                    raise ProtocolError(f"{where}: map keys must be strings, got {type(k).__name__}")
                _check(k, str, f"{where} key")
            _check_json(v, f"{where}[{k!r:.40}]" if depth < 4 else where, depth + 1)
    else:
        raise ProtocolError(f"{where}: {type(value).__name__} is not a JSON value (null, bool, number, "
                            "string, list or string-keyed map)")


def _check(value: Any, tp: Any, where: str) -> None:
    origin = typing.get_origin(tp)
    if tp is Any:
        _check_json(value, where)
        return
    if tp is float:  # finite: NaN and infinity poison sums (a worker's render seconds) and SQL NOT NULL
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (math.isfinite(value) if isinstance(value, float) else -(2**63) <= value < 2**63))
    elif tp is int:  # bounded to int64: every integer field may end up in a database column
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    elif tp is str and isinstance(value, str):
        if "\x00" in value:
            raise ProtocolError(f"{where}: a string may not contain NUL characters")
        return
    elif origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check(v, item, f"{where}[{i}]")
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        key_t, val_t = typing.get_args(tp)
        for k, v in value.items():
            _check(k, key_t, f"{where} key")
            _check(v, val_t, f"{where}[{k!r}]")
        return
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                _check(value, option, where)
                return
            except ProtocolError:
                pass
        raise ProtocolError(f"{where}: {type(value).__name__} is none of {tp}")
    elif tp is type(None):
        ok = value is None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ProtocolError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__}")


_HINTS: dict[type, dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in MESSAGES.values()}


# Fast validators: True only for values that _check accepts. A value they reject goes through _check,
# which says why (or accepts it after all): the errors are _check's, without building its ``where``
# strings for every valid element of every message.
_INT64 = 2**63


def _json_ok(v: Any, depth: int = 0) -> bool:
    t = type(v)
    if v is None or t is bool:
        return True
    if t is str:
        return "\x00" not in v
    if t is int:
        return -_INT64 <= v < _INT64
    if t is float:
        return math.isfinite(v)
    if t is list:
        return depth < MAX_NESTING and all(_json_ok(x, depth + 1) for x in v)
    if t is dict:
        return depth < MAX_NESTING and all(type(k) is str and "\x00" not in k and _json_ok(x, depth + 1)
                                           for k, x in v.items())
    return False


def _fast(tp: Any):
    if tp is Any:
        return _json_ok
    if tp is int:
        return lambda v: type(v) is int and -_INT64 <= v < _INT64
    if tp is float:
        return lambda v: (type(v) is float and math.isfinite(v)) or (type(v) is int and -_INT64 <= v < _INT64)
    if tp is str:
        return lambda v: type(v) is str and "\x00" not in v
    if tp is type(None):
        return lambda v: v is None
    origin = typing.get_origin(tp)
    if origin is list:
        item = _fast(typing.get_args(tp)[0])
        return lambda v: type(v) is list and all(item(x) for x in v)
    if origin is dict:
        key, val = (_fast(a) for a in typing.get_args(tp))
        return lambda v: type(v) is dict and all(key(k) and val(x) for k, x in v.items())
    if origin in (typing.Union, types.UnionType):
        options = [_fast(a) for a in typing.get_args(tp)]
        return lambda v: any(ok(v) for ok in options)
    return lambda v: isinstance(v, tp)


# per message class: its field names (and "command"), and per field (name, fast check, type, required)
_NAMES: dict[type, frozenset[str]] = {cls: frozenset(h) | {"command"} for cls, h in _HINTS.items()}
_FIELDS: dict[type, list[tuple[str, Any, Any, bool]]] = {
    cls: [(f.name, _fast(_HINTS[cls][f.name]), _HINTS[cls][f.name],
           f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
          for f in dataclasses.fields(cls)]
    for cls in MESSAGES.values()}


_COMMAND_BYTES = {cls: bytes([cmd]) for cmd, cls in MESSAGES.items()}
_ORDER = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGES.values()}


def encode(msg: Message) -> list[bytes]:
    """Frames for ``msg``: header, command byte, msgpack body."""
    cls = type(msg)
    command = _COMMAND_BYTES.get(cls)
    if command is None:
        raise ProtocolError(f"{cls.__name__} is not a protocol message")
    body = {name: getattr(msg, name) for name in _ORDER[cls]}
    return [PROTOCOL_HEADER, command, msgpack.packb(body, use_bin_type=True)]


def decode(frames: list) -> Message:
    """The message carried by ``frames`` (without a routing id). Raises ProtocolError if malformed.

    Frames are ``bytes``, or buffers received without a copy (``zmq.Frame``): a BLOB's chunk then stays a
    ``memoryview`` of the received frame (what the worker writes and hashes, 1 MiB a chunk, copied zero
    times instead of twice); a BLOB of any other layout than :func:`encode` writes is decoded as usual."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames (header, command, body), got {len(frames)}")
    header, command, body = frames
    if type(body) is not bytes:
        if bytes(command) == _BLOB_COMMAND and bytes(header) == PROTOCOL_HEADER:
            view = memoryview(body)
            if len(view) <= MAX_BLOB_MESSAGE_BYTES and (blob := _blob_in_place(view)) is not None:
                return blob
        body = bytes(body)
    header, command = bytes(header), bytes(command)
    if header != PROTOCOL_HEADER:
        raise ProtocolError(
            f"protocol header {header[:16]!r} is not {PROTOCOL_HEADER!r}: upgrade the worker to this "
            "coordinator's version")
    if len(command) != 1 or command[0] not in MESSAGES:
        raise ProtocolError(f"unknown command {command[:4].hex()}")
    cls = MESSAGES[command[0]]
    limit = MAX_BLOB_MESSAGE_BYTES if cls is Blob else MAX_MESSAGE_BYTES
    if len(body) > limit:
        raise ProtocolError(f"body of {len(body)} bytes exceeds the {limit} byte limit")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"{cls.__name__}: body is not valid msgpack ({exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__}: body must be a map, got {type(data).__name__}")
    unknown = data.keys() - _NAMES[cls]
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(map(str, unknown))}")
    kwargs = {}
    for name, ok, tp, required in _FIELDS[cls]:
        if name in data:
            value = data[name]
            if not ok(value):
                _check(value, tp, f"{cls.__name__}.{name}")
            kwargs[name] = value
        elif required:
            raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
    return cls(**kwargs)


_HELLO_COMMAND = bytes([Hello.command])
_BLOB_COMMAND = bytes([Blob.command])
_BLOB_KEYS = (b"\xa6sha256", b"\xa6offset", b"\xa5total", b"\xa4data", b"\xa5error")  # encode's order


def _blob_in_place(view: memoryview) -> Blob | None:
    """The BLOB in msgpack body ``view`` as :func:`encode` lays it out (a map of its five fields in order,
    non-negative ints), its chunk a slice of ``view``; None for any other layout (decode's general path
    then takes it, and says what is wrong with it). Checks what decode's validators check."""
    n, pos, values = len(view), 1, []
    if n < 1 or view[0] != 0x85:
        return None
    try:
        for key in _BLOB_KEYS:
            if view[pos:pos + len(key)] != key:
                return None
            pos += len(key)
            t = view[pos]
            if t <= 0x7F or 0xCC <= t <= 0xCF:  # non-negative int: fixint, uint 8/16/32/64
                width = 0 if t <= 0x7F else 1 << (t - 0xCC)
                value = t if not width else int.from_bytes(view[pos + 1:pos + 1 + width], "big")
                if width and pos + 1 + width > n or value >= 2**63:
                    return None
                pos += 1 + width
            elif 0xA0 <= t <= 0xBF or 0xD9 <= t <= 0xDB or 0xC4 <= t <= 0xC6:  # str (fix, 8/16/32), bin (8/16/32)
                width = 0 if t <= 0xBF else 1 << (t - (0xD9 if t >= 0xD9 else 0xC4))
                size = t - 0xA0 if not width else int.from_bytes(view[pos + 1:pos + 1 + width], "big")
                start = pos + 1 + width
                if start + size > n:
                    return None
                value = view[start:start + size]
                if t < 0xC4 or t >= 0xD9:  # a str
                    value = str(value, "utf-8")
                    if "\x00" in value:
                        return None
                pos = start + size
            else:
                return None
            values.append(value)
    except (IndexError, UnicodeDecodeError):
        return None
    sha, offset, total, data, error = values
    if pos != n or type(sha) is not str or type(offset) is not int or type(total) is not int \
            or type(data) is not memoryview or type(error) is not str:
        return None
    return Blob(sha, offset, total, data, error)


def decode_hello(frames: list[bytes]) -> Hello | None:
    """The HELLO that ``frames`` (without a routing id) carry, or None for any other message, malformed
    ones included. Cheap for the others: only the command byte is looked at."""
    if len(frames) != 3 or frames[1] != _HELLO_COMMAND:
        return None
    try:
        return decode(frames)
    except ProtocolError:
        return None


def running_pairs(pairs: list[list[int]]) -> set[tuple[int, int]]:
    """[task_id, attempt] pairs from HELLO/HEARTBEAT as a set of tuples; malformed pairs raise."""
    out = set()
    for p in pairs:
        if len(p) != 2:
            raise ProtocolError(f"running entry {p!r} is not a [task_id, attempt] pair")
        out.add((p[0], p[1]))
    return out
