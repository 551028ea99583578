"""Job changes, told at the commit that made them: what wakes the live job page and the API's event stream.

A session that changes a job (:func:`farm.store.states.transition`, a task's progress) marks the job with
:func:`touched`; when that session commits, :data:`HUB` hears the job ids (SQLAlchemy's ``after_commit``,
on whatever thread committed: the coordinator's step, an API request) and wakes the streams waiting on
them, each on its own event loop. A rolled-back session's marks are dropped.

Invariants:

* no change is missed between a stream's read and its wait: a stream takes the job's sequence number
  (:meth:`JobChanges.seq`) *before* it reads the job, and :meth:`JobChanges.wait` returns at once when a
  change came since (every commit that touched the job moved it past that number);
* waiting is bounded: a stream wakes after ``timeout`` however quiet the job is (what a change made by
  another process, which this hub cannot hear, waits at most), and each stream holds one waiter; its
  reads are paced (:class:`Follow`: a burst of 3, then 20 a second);
* the hub's memory is bounded: the last change of at most :data:`KEEP` jobs is kept (an older job's
  ``seq`` is 0: a stream waiting on it wakes on its next change or its timeout).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable

from sqlalchemy import event
from sqlalchemy.orm import Session

KEY = "changed_jobs"
KEEP = 4096
"""Jobs whose last change's sequence number the hub keeps."""


def touched(session, job_id: int | None) -> None:
    """Mark ``job_id`` as changed by ``session``: its waiters wake when the session commits."""
    if job_id is not None:
        info = session.info
        ids = info.get(KEY)
        if ids is None:
            info[KEY] = {job_id}
        else:
            ids.add(job_id)


class JobChanges:
    """Sequence numbers of job changes and the streams waiting on them (thread-safe)."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._lock = threading.Lock()
        self._n = 0
        self._last: OrderedDict[int, int] = OrderedDict()  # job id → the sequence number of its last change
        self._waiters: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}

    def seq(self, job_id: int) -> int:
        """The sequence number of ``job_id``'s last change heard (0: none kept)."""
        with self._lock:
            return self._last.get(job_id, 0)

    def changed(self, job_ids: Iterable[int]) -> None:
        """Record a committed change of ``job_ids`` and wake their waiters (from any thread)."""
        wake = []
        with self._lock:
            for job_id in job_ids:
                self._n += 1
                self._last[job_id] = self._n
                self._last.move_to_end(job_id)
                wake += self._waiters.pop(job_id, ())
            while len(self._last) > self.keep:
                self._last.popitem(last=False)
        for loop, fut in wake:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, fut)

    async def wait(self, job_id: int, since: int, timeout: float) -> bool:
        """Wait until ``job_id`` changes after sequence number ``since`` (at most ``timeout`` s); whether
        it did."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        entry = (loop, fut)
        with self._lock:
            if self._last.get(job_id, 0) > since:
                return True
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    waiting.discard(entry)
                    if not waiting:
                        del self._waiters[job_id]

    def waiting(self) -> int:
        """Streams waiting now (all jobs)."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values())


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


HUB = JobChanges()
"""The process's hub: the coordinator's commits and the web app's streams meet here (``farm serve`` runs
both in one process)."""


@event.listens_for(Session, "after_commit")
def _after_commit(session) -> None:
    ids = session.info.pop(KEY, None)
    if ids:
        HUB.changed(ids)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session) -> None:
    session.info.pop(KEY, None)



POLL_SECONDS = 0.5
"""Longest a stream waits without hearing a change before it reads the job again (changes made by another
process: the settler's, an operator's script)."""
READS_PER_SECOND, READ_BURST = 20.0, 3
"""A stream's reads of its job, paced as a token bucket: a few changes in a row are read at once (a
frame's last PROGRESS and its RESULT a few ms apart), a job changing at every step at most 20 times a second."""


class Follow:
    """One stream's view of one job's changes: take it before the stream's first read, then ``await
    follow.next()`` before each further read."""

    def __init__(self, job_id: int, hub: JobChanges | None = None):
        self.job_id, self.hub = job_id, hub or HUB
        self.seq = self.hub.seq(job_id)  # before the read: a change from now on is not missed
        self.tokens, self.at = float(READ_BURST), None

    async def next(self) -> None:
        """Wait for the job's next change (at most POLL_SECONDS), paced by the stream's read budget."""
        await self.hub.wait(self.job_id, self.seq, POLL_SECONDS)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.at is not None:
            self.tokens = min(float(READ_BURST), self.tokens + (now - self.at) * READS_PER_SECOND)
        if self.tokens < 1.0:
            await asyncio.sleep((1.0 - self.tokens) / READS_PER_SECOND)
            now = loop.time()
            self.tokens = 1.0
        self.tokens -= 1.0
        self.at = now
        self.seq = self.hub.seq(self.job_id)
