"""CURVE key files, as both sides of the worker plane keep them: the coordinator's long-term keypair
(``DATA/curve/server.key`` and ``server.key_secret``) and each worker's (``CACHE/curve/worker.key``).

pyzmq certificate files (``zmq.auth.load_certificate`` reads them), mode 600 in a 700 directory, written
atomically; a secret file found readable by others is made private again, with a warning. A public key
given on a command line may be its 40 Z85 characters or a file holding it.
"""
from __future__ import annotations

import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger("common.keys")


class KeyFileError(ValueError):
    """A key given on the command line or found in a file that is not a usable CURVE key."""


def is_key(text: Any) -> bool:
    """Whether ``text`` is a CURVE key in Z85 (40 characters for 32 bytes)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str) or len(text) != 40:
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (KeyError, ValueError, UnicodeEncodeError, struct.error):  # not Z85, or beyond 32 bits a group
        return False


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically; the file is mode 600 from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _certificate(public: str, secret: str | None, what: str) -> str:
    head = "**Secret** certificate: keep it private" if secret else "public certificate: give it to peers"
    lines = [f"#   ZeroMQ CURVE {head} ({what})", "#   zmq.auth.load_certificate reads this file", "",
             "metadata", "curve", f'    public-key = "{public}"']
    return "\n".join(lines + ([f'    secret-key = "{secret}"'] if secret else [])) + "\n"


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_or_create_keypair(directory: Path, name: str, what: str) -> tuple[bytes, bytes]:
    """The (public, secret) Z85 keys in ``directory/name.key_secret``, made on first use (``name.key``
    gets the public half). A secret file readable by others is made private again, with a warning."""
    directory = private_dir(Path(directory))
    secret_file, public_file = directory / f"{name}.key_secret", directory / f"{name}.key"
    if not secret_file.exists():
        public, secret = zmq.curve_keypair()
        write_private(secret_file, _certificate(public.decode(), secret.decode(), what))
        write_private(public_file, _certificate(public.decode(), None, what))
        log.info("new CURVE keypair for the %s in %s", what, directory)
        return public, secret
    if stat.S_IMODE(secret_file.stat().st_mode) & 0o077:
        log.warning("%s was readable by other users: made it private (mode 600); if others could read it, "
                    "delete it and the public file to make a new keypair", secret_file)
        os.chmod(secret_file, 0o600)
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{secret_file}: {exc}; delete it (and {public_file.name}) to make a new keypair") from None
    if not (is_key(public) and is_key(secret)):
        raise KeyFileError(f"{secret_file} holds no valid CURVE keypair: delete it (and {public_file.name}) "
                           "to make a new one")
    if not public_file.exists():
        write_private(public_file, _certificate(public.decode(), None, what))
    return public, secret


def read_public_key(value: str) -> bytes:
    """A public key given as its 40 Z85 characters, or as a file holding it (a pyzmq certificate, such as
    ``DATA/curve/server.key``, or the bare key)."""
    value = (value or "").strip()
    if is_key(value):
        return value.encode()
    path = Path(value).expanduser()
    if not path.is_file():
        raise KeyFileError(f"{value[:60]!r} is neither a Z85 public key (40 characters) nor a file holding one")
    text = path.read_text(errors="replace").strip()
    if is_key(text):
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    if not is_key(public):
        raise KeyFileError(f"{path} holds no valid Z85 public key")
    return public
