"""When a worker's owner lets it work: ``farm worker --schedule 22:00-08:00`` and ``--idle-only``.

Outside its window (or while the host is in use) the worker takes no new task: it sends ``READY 0``,
answers a TASK that still reaches it with RELEASE, and finishes the task it is running when it can within
``--pause-grace`` seconds, else stops it and hands the lease back with RELEASE (PROTOCOL.md, "Pausing and
earnings"): the coordinator requeues it at once, without reputation lost. It stays connected, heart-beating
(no busy loop: the daemon's loop wakes once a heartbeat interval), and takes work again when the window opens.

**The schedule** is local time: ``HH:MM-HH:MM`` ranges separated by commas; a range whose end is before its
start wraps midnight (``22:00-08:00`` is 22:00 to 08:00 the next morning); ``24:00`` may end a range.

**Idle** is what can be measured honestly on a Linux host without a display server's help (X and Wayland
input, and other programs' GPU use, are not seen — on a desktop, prefer ``--schedule``):

* the CPU time used by *other* processes — all of the host's busy time in ``/proc/stat`` minus the time of
  this worker's own process tree (its runtime children included) — stayed below ``--idle-cpu`` percent of
  the whole machine, and
* no terminal had input: the access time of ``/dev/pts/*`` and ``/dev/tty[0-9]*`` (what ``w`` shows as
  IDLE; a terminal's access time moves when someone types into it),

both for the last ``--idle-minutes``. Observation starts when the worker starts: it first waits that long.
Every reading is injected (:class:`IdleDetector`), so tests drive it with made-up numbers; a test's clock
comes from ``RENDERHIVE_CLOCK_FILE`` (:data:`worker.settings.CLOCK_FILE`).
"""
from __future__ import annotations

import datetime as dt
import glob
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from worker import settings as C

SCHEDULE_HELP = ("write local-time ranges HH:MM-HH:MM separated by commas, e.g. 22:00-08:00 (wraps midnight) "
                 "or 00:00-07:30,12:00-13:00")
_RANGE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


class ScheduleError(ValueError):
    """A ``--schedule`` that cannot be read; the message says what to write instead."""


@dataclass(frozen=True)
class Schedule:
    """Windows as (start, end) minutes of the day, end exclusive; ``start > end`` wraps midnight."""
    windows: tuple[tuple[int, int], ...]
    text: str

    def open_at(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute + when.second / 60
        return any(a <= minute < b if a < b else (minute >= a or minute < b) for a, b in self.windows)

    def next_opening(self, when: dt.datetime) -> str:
        """The HH:MM of the next window's start after ``when`` (for "resumes at ..." lines)."""
        minute = when.hour * 60 + when.minute
        start = min((a for a, _ in self.windows), key=lambda a: (a - minute) % 1440)
        return f"{start // 60:02d}:{start % 60:02d}"


def parse_schedule(text: str) -> Schedule:
    """``"22:00-08:00,12:00-13:00"`` → a Schedule. Raises ScheduleError saying what to write."""
    windows = []
    for part in (p.strip() for p in (text or "").split(",")):
        m = _RANGE.match(part)
        if not m:
            raise ScheduleError(f"--schedule {text!r}: cannot read {part!r}: {SCHEDULE_HELP}")
        h1, m1, h2, m2 = map(int, m.groups())
        for h, mi, end in ((h1, m1, False), (h2, m2, True)):
            if mi > 59 or h > 24 or (h == 24 and (mi or not end)):
                raise ScheduleError(f"--schedule {text!r}: {h:02d}:{mi:02d} in {part!r} is not a time of day "
                                    f"(00:00 to 23:59; 24:00 may end a range): {SCHEDULE_HELP}")
        a, b = h1 * 60 + m1, (h2 * 60 + m2) % 1440
        if a == b:
            raise ScheduleError(f"--schedule {text!r}: {part!r} starts where it ends; to work at all times leave "
                                f"--schedule out, else {SCHEDULE_HELP}")
        windows.append((a, b))
    return Schedule(tuple(windows), text)


def local_now() -> dt.datetime:
    """The local time; from RENDERHIVE_CLOCK_FILE ("HH:MM" or "HH:MM:SS" of today) when a test sets one."""
    if C.CLOCK_FILE:
        try:
            raw = open(C.CLOCK_FILE).read().strip()
            return dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(raw))
        except (OSError, ValueError):
            pass  # a file being rewritten: the real clock for this one look
    return dt.datetime.now()


# ------------------------------------------------------------------ readings of the host (Linux /proc)
def host_cpu() -> tuple[int, int]:
    """(total, busy) clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total, total - fields[3] - (fields[4] if len(fields) > 4 else 0)


def tree_ticks(root: int | None = None) -> int:
    """Clock ticks used by process ``root`` (this one) and all its descendants, reaped children included
    (utime + stime + cutime + cstime of each live process in the tree)."""
    root = os.getpid() if root is None else root
    parent, ticks = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(name)
        parent[pid] = int(rest[1])
        ticks[pid] = sum(int(x) for x in rest[11:15])
    total = 0
    for pid in ticks:
        p, seen = pid, 0
        while p and p != root and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p == root:
            total += ticks[pid]
    return total


def tty_input_time(patterns: Iterable[str] | None = None) -> float:
    """Unix time of the newest terminal input: the latest access time of the terminal devices (0: none)."""
    latest = 0.0
    for pattern in patterns if patterns is not None else C.IDLE_TTYS:
        for path in glob.glob(pattern):
            try:
                latest = max(latest, os.stat(path).st_atime)
            except OSError:
                pass
    return latest


class IdleDetector:
    """Whether the host has been idle for ``minutes`` (module docstring). Readings are injected:
    ``cpu()`` → (total, busy) ticks of the host, ``own()`` → ticks of this worker's tree, ``tty()`` → unix
    time of the last terminal input, ``clock()`` → unix time. Samples at most every ``sample_seconds``."""

    def __init__(self, minutes: float = 10.0, cpu_percent: float = 25.0, cpu: Callable[[], tuple[int, int]] = host_cpu,
                 own: Callable[[], int] = tree_ticks, tty: Callable[[], float] = tty_input_time,
                 clock: Callable[[], float] = time.time, sample_seconds: float = C.IDLE_SAMPLE_SECONDS):
        if minutes < 0 or not 0 < cpu_percent <= 100:
            raise ValueError("--idle-minutes must be 0 or more and --idle-cpu a percentage above 0 up to 100 "
                             "(100 ignores the CPU)")
        self.seconds, self.threshold = minutes * 60, cpu_percent / 100
        self.cpu, self.own, self.tty, self.clock = cpu, own, tty, clock
        self.sample_seconds = sample_seconds
        self.last: tuple[int, int, int] | None = None  # (total, busy, own) at the previous sample
        self.active_at = clock()  # the last time the host was seen in use (starts now: nothing seen yet)
        self.why = "the host was not watched long enough yet"
        self.others = 0.0  # the other processes' share of the machine at the last sample
        self._sampled = 0.0

    def sample(self) -> None:
        now = self.clock()
        if now - self._sampled < self.sample_seconds:
            return
        self._sampled = now
        (total, busy), own = self.cpu(), self.own()
        if self.last is not None and total > self.last[0]:
            others = (busy - self.last[1] - (own - self.last[2])) / (total - self.last[0])
            self.others = max(0.0, others)
            if self.threshold < 1 and self.others >= self.threshold:
                self.active_at, self.why = now, (f"other programs use {self.others:.0%} of the CPU "
                                                 f"(--idle-cpu {self.threshold:.0%})")
        self.last = (total, busy, own)
        typed = self.tty()
        if typed > self.active_at:
            self.active_at, self.why = min(typed, now), "someone typed in a terminal"

    def idle(self) -> tuple[bool, str]:
        """(idle, why not): idle once nothing was in use for the whole of ``minutes``."""
        self.sample()
        quiet = self.clock() - self.active_at
        if quiet >= self.seconds:
            return True, ""
        return False, f"the host is in use ({self.why}; idle after {self.seconds / 60:g} quiet minutes)"


class Availability:
    """The owner's rules together: ``reason()`` is "" while the worker may take work, else why not."""

    def __init__(self, schedule: Schedule | None = None, idle: IdleDetector | None = None,
                 clock: Callable[[], dt.datetime] = local_now, grace: float = 120.0):
        self.schedule, self.idle, self.clock, self.grace = schedule, idle, clock, grace
        self._at, self._reason = -1.0, ""

    def reason(self) -> str:
        if time.monotonic() - self._at < 1.0:  # looked at once a second at most (the loop wakes per message)
            return self._reason
        self._at = time.monotonic()
        why = ""
        if self.schedule is not None:
            now = self.clock()
            if not self.schedule.open_at(now):
                why = (f"outside the schedule {self.schedule.text} (it is {now:%H:%M}; resumes at "
                       f"{self.schedule.next_opening(now)})")
        if not why and self.idle is not None:
            why = self.idle.idle()[1]
        self._reason = why
        return why


def hand_back(now: float, paused_at: float, started: float, done: int, total: int, grace: float) -> bool:
    """Whether a task still running after a pause began at ``paused_at`` is handed back now rather than
    finished: once the grace has passed, or sooner when its progress so far (``done`` of ``total`` units
    since ``started``) says it cannot finish within the grace left."""
    left = paused_at + grace - now
    if left <= 0:
        return True
    if 0 < done < total and now > started:
        return (now - started) / done * (total - done) > left
    return False
