"""API tokens: creators and the admin authenticate with bearer tokens, stored only as sha256 hashes.

The first start of a coordinator creates the admin and writes its token to ``DATA/admin.token`` (mode
600). The admin creates creator accounts (``POST /api/users``), each with its own token.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from sqlmodel import Session, select

from farm.store.models import User

TOKEN_PREFIX = "rh_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_user(s: Session, name: str, is_admin: bool = False) -> tuple[User, str]:
    token = new_token()
    user = User(name=name, token_hash=hash_token(token), is_admin=is_admin)
    s.add(user)
    s.flush()
    return user, token


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when there is none)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return authorization[7:].strip() or None


def user_for_token(s: Session, token: str | None) -> User | None:
    if not token:
        return None
    return s.exec(select(User).where(User.token_hash == hash_token(token))).first()


def ensure_admin(s: Session, data_dir: Path) -> str | None:
    """Create the admin on first start; return its token then (None when one exists already)."""
    if s.exec(select(User).where(User.is_admin)).first() is not None:
        return None
    _, token = create_user(s, "admin", is_admin=True)
    s.commit()
    path = Path(data_dir) / "admin.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token
