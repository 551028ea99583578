"""Durable state of the farm: SQLModel tables (SQLite by default, PostgreSQL via DATABASE_URL).

Times are UNIX seconds (floats) from the coordinator's clock. Status columns hold values of the enums in
:mod:`farm.states` and are only ever changed through :func:`farm.states.transition`.
Invariants: a task's ``attempt`` is the number of its newest lease; ``worker_id``/``lease_expires`` are set
exactly while the task is assigned or running; an Attempt row exists for every lease ever granted.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> float:
    return time.time()


class User(SQLModel, table=True):
    """A creator (or the admin). The API token is stored only as its sha256."""
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    token_hash: str = Field(index=True, unique=True)
    is_admin: bool = False
    created_at: float = Field(default_factory=_now)


class WebSession(SQLModel, table=True):
    """A signed-in browser (approval page). The cookie holds a random id; only its sha256 is stored."""
    id_hash: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="user.id", index=True)
    csrf: str
    created_at: float = Field(default_factory=_now)
    expires_at: float


class Job(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    owner_id: int = Field(foreign_key="user.id", index=True)
    name: str = ""
    kind: str = "blender"
    status: str = Field(default="queued", index=True)
    priority: int = 0
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    tasks_total: int = 0
    tasks_accepted: int = 0
    tasks_failed: int = 0
    error: str = ""
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)


class Task(SQLModel, table=True):
    __table_args__ = (Index("ix_task_claim", "status", "priority", "job_id", "index"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    index: int = 0
    kind: str = "render"
    priority: int = 0  # copy of the job's, so the claim query needs no join to order
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    inputs: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    status: str = Field(default="queued", index=True)
    attempt: int = 0
    worker_id: Optional[str] = Field(default=None, index=True)
    lease_expires: Optional[float] = None
    failed_workers: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    error: str = ""
    progress_done: int = 0
    progress_total: int = 0
    render_seconds: float = 0.0
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)


class TaskDep(SQLModel, table=True):
    """``task_id`` waits until ``needs_id`` is accepted; then it gets the outputs of ``needs_id`` as inputs."""
    task_id: int = Field(foreign_key="task.id", primary_key=True)
    needs_id: int = Field(foreign_key="task.id", primary_key=True, index=True)


class Attempt(SQLModel, table=True):
    """One lease of a task to a worker, and how it ended (fencing token: (task_id, attempt))."""
    __table_args__ = (UniqueConstraint("task_id", "attempt"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    job_id: int = Field(index=True)
    attempt: int
    worker_id: str = Field(index=True)
    started_at: float = Field(default_factory=_now)
    ended_at: Optional[float] = None
    outcome: str = "leased"  # leased | done | failed | lost | canceled
    render_seconds: float = 0.0
    error: str = ""


class Worker(SQLModel, table=True):
    id: str = Field(primary_key=True)
    wallet: str = ""
    hostname: str = ""
    capabilities: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    slots: int = 1
    online: bool = False
    first_seen: float = Field(default_factory=_now)
    last_seen: float = Field(default_factory=_now)
    tasks_done: int = 0
    tasks_failed: int = 0
    render_seconds: float = 0.0


class JobWorker(SQLModel, table=True):
    """Failures of one worker within one job; at JOB_WORKER_FAILURE_LIMIT it is blocklisted for the job."""
    job_id: int = Field(foreign_key="job.id", primary_key=True)
    worker_id: str = Field(primary_key=True)
    failures: int = 0
    blocked: bool = False


class Blob(SQLModel, table=True):
    """A content-addressed file in the blob store (path derived from the hash)."""
    sha256: str = Field(primary_key=True, max_length=64)
    size: int
    origin: str = "upload"  # upload | worker
    created_at: float = Field(default_factory=_now)


class Output(SQLModel, table=True):
    """A file a task produced, from its accepted attempt. ``final`` outputs (frames, images, videos) are
    the job's results; the others (tiles) are intermediate, fed to dependent tasks only."""
    __table_args__ = (UniqueConstraint("job_id", "name"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    task_id: int = Field(index=True)
    attempt: int
    frame: int
    name: str
    sha256: str
    size: int
    final: bool = True
    worker_id: str = ""
    render_seconds: float = 0.0
    created_at: float = Field(default_factory=_now)


class Event(SQLModel, table=True):
    """The audit log: every status change, with the worker and attempt that caused it."""
    id: Optional[int] = Field(default=None, primary_key=True)
    at: float = Field(default_factory=_now, index=True)
    kind: str  # job | task | worker
    job_id: Optional[int] = Field(default=None, index=True)
    task_id: Optional[int] = Field(default=None, index=True)
    attempt: Optional[int] = None
    worker_id: Optional[str] = None
    old: str = ""
    new: str = ""
    detail: str = ""
