"""The ledger as an asyncio background task of ``farm serve``.

Each pass runs :meth:`farm.payments.ledger.Ledger.sync` in a thread (chain calls block), then moves jobs
whose deposit is confirmed to ``queued`` and approved jobs to ``paid`` through ``serial``, the
coordinator's thread, so that job rows are never written by two threads at once. A chain that is down is
retried with backoff, never skipped: nothing is lost while it is down. ``wake`` runs a pass soon (a job
was approved, rejected or submitted).
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

from farm.payments import chain as ch
from farm.payments.ledger import Ledger

log = logging.getLogger("farm.payments.ledger")


class Settler:
    """The ledger as an asyncio background task: sync in a thread, then finalize paid jobs through
    ``serial`` (the coordinator's thread). A chain that is down is retried with backoff, never skipped."""

    def __init__(self, ledger: Ledger, serial: Callable[..., Any], interval: float | None = None,
                 max_backoff: float | None = None):
        self.ledger, self.serial = ledger, serial
        self.interval = interval or float(os.environ.get("RENDERHIVE_SETTLE_INTERVAL", "1.0"))
        self.max_backoff = max_backoff or float(os.environ.get("RENDERHIVE_SETTLE_MAX_BACKOFF", "10"))
        self._wake = asyncio.Event()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._funded = 0  # deposits announced by the ledger so far (funded_hook)
        ledger.wake_hook = self.wake
        ledger.funded_hook = self.funded

    def wake(self) -> None:
        self._wake.set()

    def funded(self, job_id: int) -> None:
        """From the pass's thread: a deposit was confirmed; queue the job now, on the coordinator's thread
        (the pass's own ``to_fund`` afterwards finds it queued: ``fund`` is idempotent)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._funded += 1
        asyncio.run_coroutine_threadsafe(self.serial(self.ledger.fund, job_id), loop).add_done_callback(
            self._funded_done)

    @staticmethod
    def _funded_done(fut) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("queueing a funded job failed (the next pass retries it): %r", fut.exception())

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        delay, down = self.interval, False
        while not self._stop:
            try:
                before = self._funded
                await asyncio.to_thread(self.ledger.sync, False)
                funding = await asyncio.to_thread(self.ledger.to_fund)
                for job_id in funding:
                    await self.serial(self.ledger.fund, job_id)
                # a job just queued has its first leases going out now, and the closing scan (chain reads and
                # a write) would compete with them: then the next pass's opening scan mirrors the events
                if not funding and self._funded == before:
                    await asyncio.to_thread(self.ledger.scan_events)
                for job_id in await asyncio.to_thread(self.ledger.to_finalize):
                    await self.serial(self.ledger.finalize, job_id)
                if down:
                    log.info("chain reachable again: settlement resumed")
                delay, down = self.interval, False
            except ch.ChainUnavailable as exc:
                if not down:
                    log.warning("%s: settlement waits and retries (nothing is lost)", exc)
                down, delay = True, min(self.max_backoff, delay * 2)
            except Exception:
                log.exception("settlement pass failed; retrying")
                delay = min(self.max_backoff, delay * 2)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
