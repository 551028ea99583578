"""What the core needs from payments to tell workers about money: the port the coordinator is given
(``Coordinator(earnings=...)``), so that ``farm.core`` never imports ``farm.payments``.

:class:`farm.payments.earnings.WorkerEarnings` implements it; ``farm serve`` passes one (in-process tests
pass none, and their workers hear nothing of prices). Every method runs on the coordinator's thread inside
the step's session ``s``; it only reads.
"""
from __future__ import annotations

from typing import Protocol

from sqlmodel import Session

from common import protocol as P


class Earnings(Protocol):
    def price(self) -> P.Price:
        """What one unit of measured work pays now (sent after every WELCOME)."""

    def recent(self, s: Session, worker_id: str) -> list[P.Earned]:
        """The worker's credited shares of the farm's newest settled jobs (sent after its HELLO)."""

    def credited(self, s: Session, now: float) -> list[tuple[str, P.Earned]]:
        """(worker id, share) of the shares credited since the last call (each sweep)."""

    def moved(self, now: float) -> P.Price | None:
        """PRICE for every connected worker when the price moved enough since it was last told (each sweep)."""
