"""The worker's side of CurveZMQ: its keypair, the coordinator key it pins, its enrollment token, and a
plain-words account of a handshake that failed.

The keypair lives in ``CACHE/curve/worker.key_secret`` (mode 600; ``worker.key`` holds the public half),
made on first start, so a worker keeps its identity across restarts as long as it keeps its cache.
``--server-key`` pins the coordinator: the DEALER is a CURVE client of that key only, so a coordinator
with another key (or an impostor on its address) fails the handshake before a byte of the protocol is
sent, and the worker says which setting to check (:class:`HandshakeWatch`).
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq
from zmq.utils.monitor import parse_monitor_message

from common import keys

WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def worker_keypair(cache_dir: Path) -> tuple[bytes, bytes]:
    """This worker's (public, secret) Z85 keys, made on first use in ``cache_dir/curve``."""
    return keys.load_or_create_keypair(Path(cache_dir) / "curve", "worker", "Renderhive worker")


def enroll_token(value: str | None) -> str:
    """``--enroll-token``: the token itself, or a file holding it (e.g. a copy of DATA/curve/enroll.token)."""
    value = (value or "").strip()
    path = Path(value).expanduser()
    if value and path.is_file():
        lines = path.read_text().split()
        return lines[0] if lines else ""
    if os.sep in value:  # tokens never hold a slash: this was meant as a file
        raise keys.KeyFileError(f"--enroll-token {value!r}: no such file (give the token, or a file holding it)")
    return value


def secure_client(sock: zmq.Socket, server_key: bytes, keypair: tuple[bytes, bytes]) -> None:
    """Make ``sock`` (not yet connected) a CURVE client that talks only to the holder of ``server_key``."""
    sock.curve_serverkey = server_key
    sock.curve_publickey, sock.curve_secretkey = keypair


class HandshakeWatch:
    """Follows the handshakes of one socket through a ZeroMQ monitor: ``socket`` is the monitor to poll,
    :meth:`drain` returns the explanation of a failed handshake (None while none failed)."""

    def __init__(self, sock: zmq.Socket, endpoint: str, public_key: bytes):
        self.sock = sock
        self.socket = sock.get_monitor_socket(WATCHED)
        self.endpoint = endpoint
        self.public_key = public_key.decode()
        self.succeeded = False

    async def drain(self) -> str | None:
        """Read the waiting monitor events; the reason of the first failed handshake among them, if any."""
        failure = None
        while True:
            try:
                event = parse_monitor_message(await self.socket.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                return failure
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded = True
            elif failure is None and kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                failure = (f"the coordinator at {self.endpoint} refused this worker's key {self.public_key} "
                           f"(ZAP status {event['value']}): the key was revoked, or the farm admits only keys on "
                           f"its allow-list; ask its operator to run `farm workers allow '{self.public_key}'`")
            elif failure is None:
                failure = (f"the secure handshake with {self.endpoint} failed: the coordinator there does not hold "
                           "the key this worker pins, so nothing was sent. Check --server-key: it must be the key "
                           "that `farm serve` prints at start (or `farm serve --print-key --data DIR`)")

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(0)
