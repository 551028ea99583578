"""What the worker's owner sees of the money: the farm's current price at connect (PRICE) and one line per
job when its share is credited (EARNED), with a running total for this session.

The coordinator sends EARNED when the creator's approval credits the share, and again after every HELLO for
recent jobs (a worker that was away hears of them then); each job is printed once: the job ids already
printed are kept in ``earned.json`` in the cache folder (the newest :data:`KEEP`).
"""
from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from pathlib import Path

from common import protocol as P

KEEP = 1000
"""Job ids remembered as printed (the coordinator re-sends at most its 50 newest settled jobs)."""


def _dec(text: str) -> Decimal:
    try:
        return Decimal(text)
    except (InvalidOperation, TypeError):
        return Decimal(0)


class EarningsLog:
    def __init__(self, worker_id: str, cache_dir: Path, wallet: str = ""):
        self.worker_id, self.wallet = worker_id, wallet
        self.path = Path(cache_dir) / "earned.json"
        try:
            self.seen: list[int] = [int(j) for j in json.loads(self.path.read_text())][-KEEP:]
        except (OSError, ValueError, TypeError):
            self.seen = []
        self.total = Decimal(0)
        self.price: P.Price | None = None

    def price_line(self, msg: P.Price) -> str:
        self.price = msg
        if msg.note:
            return f"worker {self.worker_id}: {msg.note}"
        to = f"credited to {self.wallet}" if self.wallet else "NOT payable: this worker has no --wallet"
        return (f"worker {self.worker_id}: current price {msg.tokens_per_unit} tokens per {msg.unit}; "
                f"earnings are {to} once a creator approves the job")

    def earned_line(self, msg: P.Earned) -> str | None:
        """The line for ``msg``, or None when this job was printed before."""
        if msg.job_id in self.seen:
            return None
        self.seen = (self.seen + [msg.job_id])[-KEEP:]
        try:
            self.path.write_text(json.dumps(self.seen))
        except OSError:
            pass  # the line is printed anyway; it may be printed again after a restart
        self.total += _dec(msg.tokens)
        checks = f" + {msg.checks} spot check(s), {msg.check_seconds:.2f} s" if msg.checks else ""
        price = msg.tokens_per_unit or (self.price.tokens_per_unit if self.price else "?")
        return (f"worker {self.worker_id}: job {msg.job_id}: earned {msg.tokens} tokens for {msg.work_seconds:.2f} s "
                f"of measured work in {msg.tasks} task(s){checks} at {price} tokens per unit "
                f"(this session: {format(self.total.normalize(), 'f')} tokens)")
