"""The worker owner's view with real processes: `farm serve` and `farm worker` daemons rendering the sample
scene. A schedule window that closes while a worker renders: it hands its task back, takes nothing while
outside, is not penalised, and works again once the window opens (its clock is a file the test rewrites,
RENDERHIVE_CLOCK_FILE). ``--idle-only``: terminal input (a file standing for /dev/pts/N) pauses a worker,
which finishes its task within the grace and takes no other. A paid job: the worker prints what it earned.
"""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from client import localfarm
from farm.store.db import database_url, make_engine
from farm.store.models import Attempt, JobWorker, Output, ReputationEvent, Worker
from tests.conftest import TEST_ENV, submit_sample, wait_for, wait_job, wait_workers
from tests.fixtures_inproc import get, rows
from tests.payments.test_ledger import wallet_of

pytestmark = pytest.mark.slow
OFF = {"RENDERHIVE_CHAIN_RPC": "off"}
FAST = {"RENDERHIVE_SETTLE_INTERVAL": "0.3", "RENDERHIVE_SETTLE_MAX_BACKOFF": "1"}


def slow_worker(f, procs, worker_id: str, delay: float, args: list[str], env: dict[str, str]):
    """A real `farm worker` whose every task takes ``delay`` seconds longer (tests/helpers/slow_worker.py)."""
    w = localfarm.WorkerProc(f.root / worker_id, f, worker_id, localfarm.process_env({**TEST_ENV, **env}),
                             gpus="none", module="tests.helpers.slow_worker", extra_args=["--no-benchmark", *args],
                             argv_prefix=["--delay", str(delay)])
    procs.append(w)
    return w.start()


def says(w, pattern: str, timeout: float = 30) -> re.Match:
    return wait_for(lambda: re.search(pattern, w.log.read_text()), timeout, what=f"{w.worker_id} to print {pattern!r}")


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` itself (utime + stime), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def standing(engine, worker_id: str) -> tuple:
    w = get(engine, Worker, worker_id)
    return w.reputation, w.tier, w.tasks_failed


def test_a_schedule_that_closes_mid_task_hands_it_back_then_resumes(farm, worker, procs, tmp_path):
    f = farm(OFF)
    clock = tmp_path / "clock"
    clock.write_text("10:30")
    a = slow_worker(f, procs, "night", 4, ["--schedule", "10:00-11:00", "--pause-grace", "0"],
                    {"RENDERHIVE_CLOCK_FILE": str(clock)})
    alice = f.creator("alice")
    wait_workers(alice, 1)
    db = make_engine(database_url(f.data))
    job = submit_sample(alice, "1-3")
    wait_for(lambda: any(t["worker_id"] == "night" and t["status"] == "running"
                         for t in alice.job(job["id"])["task_list"]), 30, what="night to be rendering")
    before = standing(db, "night")
    paused_at = time.time()
    clock.write_text("11:30")  # the window closes while it renders
    says(a, r"paused, outside the schedule 10:00-11:00 \(it is 11:30; resumes at 10:00\)")
    says(a, r"handed task \d+/1 back")
    t0, cpu0 = time.monotonic(), cpu_seconds(a.p.pid)
    worker(f, "day", args=["--no-benchmark"])
    wait_for(lambda: alice.job(job["id"])["frames_done"] == 3, 60, what="day to render every frame")
    # day is new: its frames wait for spot checks by another worker, and the only other one is paused
    time.sleep(3)
    paused_cpu = (cpu_seconds(a.p.pid) - cpu0) / (time.monotonic() - t0)
    print(f"paused worker's CPU: {paused_cpu:.4f} s a second over {time.monotonic() - t0:.1f} s")
    assert paused_cpu < 0.1, "no busy loop while paused"
    assert alice.job(job["id"])["status"] == "active", "the checks wait: nobody else may verify day"
    held = rows(db, Attempt, Attempt.worker_id == "night")
    # it hands back what it held when the window closed — the task it rendered and the one it had
    # prefetched (farm/core/prefetch.py) — and takes nothing (not even a queued check) while outside
    assert {x.outcome for x in held} == {"released"} and 1 <= len(held) <= 2, [(x.outcome, x.task_id) for x in held]
    assert all(x.started_at < paused_at for x in held), "it took no new task while outside its window"
    assert standing(db, "night") == before, "pausing costs no reputation"
    assert rows(db, ReputationEvent, ReputationEvent.worker_id == "night") == []
    assert rows(db, JobWorker, JobWorker.worker_id == "night") == [], "neither failing nor stalling nor blocked"
    assert get(db, Worker, "night").online, "it stayed connected"

    clock.write_text("10:15")  # the window opens again: night takes work, the checks of day's frames
    says(a, r"resumed: takes tasks again")
    assert wait_job(alice, job["id"], timeout=90)["status"] == "rendered"
    assert {o.worker_id for o in rows(db, Output, Output.job_id == job["id"])} == {"day"}
    assert sorted(o.frame for o in rows(db, Output, Output.job_id == job["id"])) == [1, 2, 3]
    checks = alice.job(job["id"])["checks"]
    assert checks and {c["verifier_id"] for c in checks} == {"night"}
    assert {x.outcome for x in rows(db, Attempt, Attempt.worker_id == "night")} == {"released", "done"}


def test_idle_only_pauses_on_terminal_input_finishing_the_task_it_runs(farm, worker, procs, tmp_path):
    f = farm(OFF)
    tty = tmp_path / "pts0"
    tty.touch()
    os.utime(tty, (1, 1))  # nobody typed for ages
    a = slow_worker(f, procs, "idler", 4, ["--idle-only", "--idle-minutes", "0.05", "--idle-cpu", "100",
                                           "--pause-grace", "60"],
                    {"RENDERHIVE_IDLE_TTYS": str(tty), "RENDERHIVE_IDLE_SAMPLE_SECONDS": "0.2"})
    alice = f.creator("alice")
    wait_workers(alice, 1)
    says(a, r"resumed: takes tasks again")  # 3 quiet seconds after it started
    db = make_engine(database_url(f.data))
    job = submit_sample(alice, "1-3")
    wait_for(lambda: any(t["worker_id"] == "idler" for t in alice.job(job["id"])["task_list"]), 30,
             what="idler to take a task")
    typing = threading.Event()

    def type_():  # someone types in a terminal, every 0.3 s
        while not typing.is_set():
            now = time.time()
            os.utime(tty, (now, now))
            time.sleep(0.3)
    th = threading.Thread(target=type_, daemon=True)
    th.start()
    try:
        says(a, r"paused, the host is in use \(someone typed in a terminal")
        worker(f, "other", args=["--no-benchmark"])
        wait_for(lambda: alice.job(job["id"])["frames_done"] == 3, 60, what="every frame rendered")
        time.sleep(2)
    finally:
        typing.set()  # nobody types any more: after 3 quiet seconds idler takes work again (other's checks)
        th.join()
        stopped = time.time()
    mine = rows(db, Attempt, Attempt.worker_id == "idler")
    before = sorted((x.outcome, x.progressed) for x in mine if x.started_at < stopped)
    # it finished the task it rendered within the grace; the one it had prefetched (never started) it
    # handed back at once; it took no other while the host was in use
    assert before in ([("done", True)], [("done", True), ("released", False)]), before
    says(a, r"resumed: takes tasks again(.*\n)+.*resumed: takes tasks again")
    assert wait_job(alice, job["id"], timeout=90)["status"] == "rendered"
    frames = {o.frame: o.worker_id for o in rows(db, Output, Output.job_id == job["id"])}
    assert sorted(frames) == [1, 2, 3] and list(frames.values()).count("idler") == 1


def test_a_worker_prints_the_price_at_connect_and_what_it_earned_per_job(farm, worker):
    f = farm(FAST)
    addr = wallet_of("w1")
    w = worker(f, "w1", env={"RENDERHIVE_WALLET": addr}, args=["--no-benchmark"])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    says(w, rf"current price 0\.01 tokens per reference second of measured work; earnings are credited to {addr}")
    job = submit_sample(alice, "1-2")
    assert wait_job(alice, job["id"])["status"] == "rendered"
    wait_for(lambda: alice.payment(job["id"])["status"] == "posted", 60, what="the payout list posted")
    assert not re.search(r"job \d+: earned", w.log.read_text()), "not earned before the creator approves"
    alice.approve(job["id"])
    m = says(w, rf"job {job['id']}: earned ([0-9.]+) tokens for ([0-9.]+) s of measured work in (\d+) task\(s\)"
                r".* at ([0-9.]+) tokens per unit", 60)
    [row] = alice.payouts(job["id"])["workers"]
    assert m.group(1) == row["amount_tokens"] and int(m.group(3)) == row["tasks"] == 2
    assert abs(float(m.group(2)) - row["work_seconds"]) < 0.01
    assert m.group(4) == "0.01"
    time.sleep(1.5)
    assert len(re.findall(rf"job {job['id']}: earned", w.log.read_text())) == 1
