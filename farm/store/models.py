"""Durable state of the farm: SQLModel tables (SQLite by default, PostgreSQL via DATABASE_URL).

Times are UNIX seconds (floats) from the coordinator's clock. Status columns hold values of the enums in
:mod:`farm.store.states` and are only ever changed through :func:`farm.store.states.transition`.
Invariants: a task's ``attempt`` is the number of its newest lease; ``worker_id``/``lease_expires`` are set
exactly while the task is assigned or running; an Attempt row exists for every lease ever granted.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> float:
    return time.time()


class User(SQLModel, table=True):
    """A creator (or the admin). The API token is stored only as its sha256."""
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    token_hash: str = Field(index=True, unique=True)
    is_admin: bool = False
    # the operator trusts this creator to pay: its jobs are leased before their deposit is confirmed
    credit_line: bool = False
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
    status: str = "queued"  # indexed by ix_task_claim, whose first column it is
    attempt: int = 0
    worker_id: Optional[str] = Field(default=None, index=True)
    lease_expires: Optional[float] = None
    failed_workers: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    error: str = ""
    progress_done: int = 0
    progress_total: int = 0
    render_seconds: float = 0.0
    work_units: float = 0.0  # metered cost of the accepted attempt: seconds × the worker's speed
    # set on the re-render of a spot check (farm/verify/verifier.py): not the job's work, never paid
    check_id: Optional[int] = Field(default=None, index=True)
    # the probe render of a job without history for its scene (farm/kinds/probe.py): leased while its job is
    # probing, its output discarded, never counted as the job's work; the worker is not told
    probe: bool = False
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
    task_id: int = Field(foreign_key="task.id")  # indexed by the unique (task_id, attempt)
    job_id: int = Field(index=True)
    attempt: int
    worker_id: str = Field(index=True)
    started_at: float = Field(default_factory=_now)
    ended_at: Optional[float] = None
    outcome: str = "leased"  # leased | done | failed | lost | canceled | released (handed back by a paused worker)
    progressed: bool = False  # the worker showed progress on it (a lease lost before that never started)
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
    work_units: float = 0.0
    # benchmark and reputation (farm/verify/reputation.py): work units a second as claimed in HELLO and as
    # measured by the coordinator; decayed counts of good and bad evidence; the tier they give
    benchmark: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    speed_measured: float = 0.0
    speed_samples: int = 0
    rep_good: float = 0.0
    rep_bad: float = 0.0
    rep_at: float = 0.0
    reputation: float = 0.5
    tier: str = "new"
    checks_passed: int = 0
    checks_failed: int = 0
    vouched: bool = False  # an operator's own machine: trusted from the start


class ReputationEvent(SQLModel, table=True):
    """The history of a worker's reputation: each piece of evidence, its weight, and the score after it."""
    id: Optional[int] = Field(default=None, primary_key=True)
    at: float = Field(default_factory=_now, index=True)
    worker_id: str = Field(index=True)
    kind: str  # check_passed | check_failed | probe_passed | probe_failed | failure | lease_lost | ...
    good: float = 0.0
    bad: float = 0.0
    score: float = 0.5
    tier: str = "new"
    job_id: Optional[int] = None
    task_id: Optional[int] = None
    detail: str = ""


class Check(SQLModel, table=True):
    """A verification of one result: a different worker re-renders regions of it (or all of it) and the
    coordinator compares. ``task_id``/``attempt``: the result checked; ``verify_task_id``: the re-render."""
    id: Optional[int] = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    task_id: int = Field(index=True)
    attempt: int
    suspect_id: str = Field(index=True)   # the worker whose result is checked (a probe: the probed worker)
    verifier_id: str = ""
    verify_task_id: Optional[int] = Field(default=None, index=True)
    mode: str = "crops"        # crops | full | probe | tiebreak
    reason: str = ""           # sampled | new worker | duplicate output | uniform image | recheck | ...
    frame: int = 0
    output_name: str = ""
    regions: list[Any] = Field(default_factory=list, sa_column=Column(JSON))
    status: str = Field(default="pending", index=True)  # pending | passed | failed | unverified | canceled
    metric: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    parent_id: Optional[int] = None  # a tiebreak's disputed check
    created_at: float = Field(default_factory=_now)
    decided_at: Optional[float] = None


class JobWorker(SQLModel, table=True):
    """Failures of one worker within one job; at JOB_WORKER_FAILURE_LIMIT it is blocklisted for the job."""
    job_id: int = Field(foreign_key="job.id", primary_key=True)
    worker_id: str = Field(primary_key=True)
    failures: int = 0
    blocked: bool = False


class Blob(SQLModel, table=True):
    """A content-addressed file in the blob store (path derived from the hash)."""
    sha256: str = Field(primary_key=True, max_length=64)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))  # blobs reach 4 GiB: 64-bit on PostgreSQL
    origin: str = "upload"  # upload | worker
    created_at: float = Field(default_factory=_now)


class Output(SQLModel, table=True):
    """A file a task produced, from its accepted attempt. ``final`` outputs (frames, images, videos) are
    the job's results; the others (tiles) are intermediate, fed to dependent tasks only."""
    __table_args__ = (UniqueConstraint("job_id", "name"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")  # indexed by the unique (job_id, name)
    task_id: int = Field(index=True)
    attempt: int
    frame: int
    name: str
    sha256: str = Field(index=True)  # every result is looked up here: is it a copy of another output?
    size: int = Field(sa_column=Column(BigInteger, nullable=False))  # blobs reach 4 GiB: 64-bit on PostgreSQL
    final: bool = True
    worker_id: str = ""
    render_seconds: float = 0.0
    created_at: float = Field(default_factory=_now)


class Event(SQLModel, table=True):
    """The audit log: every status change, with the worker and attempt that caused it."""
    id: Optional[int] = Field(default=None, primary_key=True)
    at: float = Field(default_factory=_now)  # not indexed: the log is read by job or task, in id order
    kind: str  # job | task | worker
    job_id: Optional[int] = Field(default=None, index=True)
    task_id: Optional[int] = Field(default=None, index=True)
    attempt: Optional[int] = None
    worker_id: Optional[str] = None
    old: str = ""
    new: str = ""
    detail: str = ""
