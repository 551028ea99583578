"""The owner's rules as units: ``--schedule`` parsing and windows (wrapping midnight), the idle detector fed
made-up readings of /proc and terminals, when a running task is handed back, and the earnings lines."""
from __future__ import annotations

import datetime as dt
import os

import pytest

from common import protocol as P
from worker import availability as A
from worker.earnings import EarningsLog


def at(hhmm: str) -> dt.datetime:
    return dt.datetime.combine(dt.date(2025, 3, 1), dt.time.fromisoformat(hhmm))


def test_schedule_wraps_midnight_and_takes_several_windows():
    s = A.parse_schedule("22:00-08:00")
    assert [s.open_at(at(t)) for t in ("21:59", "22:00", "23:59:59", "00:00", "07:59", "08:00", "12:00")] == \
        [False, True, True, True, True, False, False]
    two = A.parse_schedule(" 00:00-07:30 , 12:00-13:00")
    assert [two.open_at(at(t)) for t in ("07:29", "07:30", "11:59", "12:30", "13:00")] == [True, False, False, True, False]
    assert A.parse_schedule("18:00-24:00").open_at(at("23:59")) and not A.parse_schedule("18:00-24:00").open_at(at("00:00"))
    assert s.next_opening(at("09:00")) == "22:00" and two.next_opening(at("08:00")) == "12:00"
    assert two.next_opening(at("13:30")) == "00:00"


@pytest.mark.parametrize("bad, says", [
    ("", "cannot read ''"), ("22-08", "cannot read '22-08'"), ("22:00 08:00", "cannot read"),
    ("25:00-08:00", "25:00"), ("10:60-11:00", "10:60"), ("24:00-08:00", "24:00"), ("10:00-10:00", "starts where it ends"),
    ("10:00-11:00,", "cannot read ''"),
])
def test_a_bad_schedule_says_what_to_write(bad, says):
    with pytest.raises(A.ScheduleError) as err:
        A.parse_schedule(bad)
    assert says in str(err.value)
    assert "HH:MM-HH:MM" in str(err.value) or "leave --schedule out" in str(err.value)


class Host:
    """Made-up readings: ticks of the whole host and of the worker's tree, the last terminal input, time."""

    def __init__(self):
        self.t, self.total, self.busy, self.own, self.typed = 1000.0, 0, 0, 0, 0.0

    def run(self, seconds: float, others: float, own: float = 0.0, cpus: int = 4) -> None:
        """``seconds`` pass with ``others`` and ``own`` of the machine busy (fractions)."""
        ticks = int(seconds * 100 * cpus)
        self.t += seconds
        self.total += ticks
        self.busy += int(ticks * (others + own))
        self.own += int(ticks * own)

    def detector(self, minutes: float = 1.0, cpu: float = 25.0) -> A.IdleDetector:
        return A.IdleDetector(minutes, cpu, cpu=lambda: (self.total, self.busy), own=lambda: self.own,
                              tty=lambda: self.typed, clock=lambda: self.t, sample_seconds=0)


def test_idle_after_quiet_minutes_and_the_workers_own_load_does_not_count():
    h = Host()
    d = h.detector(minutes=1)
    assert d.idle()[0] is False  # nothing watched yet
    for _ in range(6):
        h.run(10, others=0.05, own=0.9)  # the worker renders flat out: the host is still idle
        d.idle()
    assert d.idle() == (True, "")
    h.run(10, others=0.40, own=0.5)  # someone else's compile
    idle, why = d.idle()
    assert not idle and "other programs use 40% of the CPU" in why
    for _ in range(5):
        h.run(10, others=0.1)
        assert d.idle()[0] is False  # 50 s quiet of the 60 needed
    h.run(10, others=0.1)
    assert d.idle()[0] is True


def test_terminal_input_makes_the_host_busy_and_100_percent_ignores_the_cpu():
    h = Host()
    d = h.detector(minutes=1, cpu=100)
    h.run(61, others=0.99)
    assert d.idle()[0] is True  # --idle-cpu 100: the CPU is not looked at
    h.typed = h.t - 5
    idle, why = d.idle()
    assert not idle and "someone typed in a terminal" in why
    h.run(56, others=0.0)
    assert d.idle()[0] is True  # 61 s after the key press
    with pytest.raises(ValueError, match="--idle-cpu"):
        A.IdleDetector(1, 0)


def test_real_readings_of_this_host_are_sane(tmp_path):
    total, busy = A.host_cpu()
    assert 0 <= busy <= total
    assert A.tree_ticks() > 0  # this test process has used some CPU
    tty = tmp_path / "pts0"
    tty.touch()
    os.utime(tty, (1234.5, 1234.5))
    assert A.tty_input_time([str(tmp_path / "pts*")]) == 1234.5
    assert A.tty_input_time([str(tmp_path / "none*")]) == 0.0


def test_availability_combines_schedule_and_idle():
    now = [at("09:00")]
    rules = A.Availability(A.parse_schedule("22:00-08:00"), clock=lambda: now[0])
    assert "outside the schedule 22:00-08:00 (it is 09:00; resumes at 22:00)" == rules.reason()
    now[0] = at("23:00")
    rules._at = -1.0  # looked at once a second: look again now
    assert rules.reason() == ""


@pytest.mark.parametrize("now, done, total, back", [
    (100, 0, 1, False),     # no progress to judge by: waits for the grace
    (130, 0, 1, True),      # the grace (30 s) has passed
    (110, 1, 4, True),      # 10 s a unit since it started at 100, 30 s left to do, 20 s of grace left
    (110, 3, 4, False),     # ~3.3 s left: it finishes
])
def test_a_running_task_is_handed_back_when_it_cannot_finish_within_the_grace(now, done, total, back):
    assert A.hand_back(now, paused_at=100, started=100 if done else 90, done=done, total=total, grace=30) is back


def test_earnings_lines_are_printed_once_per_job_across_restarts(tmp_path):
    log = EarningsLog("w1", tmp_path, wallet="0xabc")
    assert log.price_line(P.Price("0.01", "reference second of measured work")) == (
        "worker w1: current price 0.01 tokens per reference second of measured work; earnings are credited to "
        "0xabc once a creator approves the job")
    line = log.earned_line(P.Earned(7, "12300000000000000", "0.0123", 1.23, 4, 0.0, 0, "0.01"))
    assert line == ("worker w1: job 7: earned 0.0123 tokens for 1.23 s of measured work in 4 task(s) at 0.01 tokens "
                    "per unit (this session: 0.0123 tokens)")
    assert log.earned_line(P.Earned(7, "1", "0.0123", 1.23, 4)) is None
    line = log.earned_line(P.Earned(8, "1", "0.001", 0.1, 1, 0.05, 1, "0.01"))
    assert "+ 1 spot check(s), 0.05 s" in line and "(this session: 0.0133 tokens)" in line
    again = EarningsLog("w1", tmp_path)
    assert again.earned_line(P.Earned(7, "1", "0.0123", 1.23, 4)) is None
    assert "NOT payable" in again.price_line(P.Price("0.01", "unit"))
    assert "payments are off" in again.price_line(P.Price("0.01", "unit", "payments are off on this farm"))
