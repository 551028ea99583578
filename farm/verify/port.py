"""What verification needs from the coordinator's core: the port :class:`farm.verify.verifier.Verifier` is
given, so that this package never imports ``farm.core`` (the core imports verification, not the reverse).

The core (:class:`farm.core.coordinator.Coordinator`) implements it. Every method runs on the
coordinator's thread, inside the step's session ``s``, so what the verifier does through the port lands in
the same transaction as the result that caused it.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

from sqlmodel import Session

from farm.store.blobs import BlobStore
from farm.store.models import Job, Task, Worker


class Seat(Protocol):
    """A connected worker as verification sees it (the core's in-memory connection)."""
    worker_id: str
    tier: str


class Core(Protocol):
    blobs: BlobStore
    """The coordinator's blob store: where results and re-renders are read from to compare them."""

    def accept(self, s: Session, task: Task, job: Job, worker_id: str, now: float) -> None:
        """Count a stored, verified result as good work: meter it, release its dependents, finish the job."""

    def evidence(self, s: Session, w: Worker, kind: str, now: float, job_id: int | None = None,
                 task_id: int | None = None, detail: str = "") -> None:
        """Record reputation evidence about ``w`` and give the scheduler its new standing at once."""

    def revoke_one(self, s: Session, task: Task, reason: str, now: float) -> None:
        """End a live lease of ``task`` (CANCEL to its worker); the caller moves the task."""

    def request_assignment(self) -> None:
        """Run an assignment round at the end of this step: work (a check, a re-render) was queued."""

    def seats(self) -> Iterable[Seat]:
        """The connected workers."""

    def fits(self, kind: str, seat: Seat, spec: dict[str, Any] | None) -> bool:
        """Whether ``seat``'s runtimes (and models) can run a task of ``kind`` with ``spec``."""
