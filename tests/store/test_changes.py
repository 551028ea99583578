"""Job changes told at commit (farm/store/changes.py) on a real SQLite file: a stream waiting on a job is
woken by the commit that changed it (from another thread, as the coordinator's step commits), never by a
rolled-back change; a change between a stream's read and its wait is not missed; the hub's memory is
bounded; and the API's event stream delivers a new output at the step that stored it, not at a poll."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import uvicorn

from common import protocol as P
from farm.store import changes
from farm.store.db import session as new_session
from farm.store.models import Job
from farm.store.states import JobStatus, transition
from farm.web.app import create_app
from tests.conftest import wait_for
from tests.fixtures_inproc import Driver, make_engine_and_store, make_job, make_user, new_coordinator, of, output_blob

NEVER = 30.0  # a wait that ends by its timeout fails the test: the change was not heard


@pytest.fixture
def farm(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, token = make_user(engine, "alice")
    return engine, blobs, user, token


def change_in_thread(engine, job_id: int, rollback: bool = False) -> None:
    def run():
        with new_session(engine) as s:
            transition(s, s.get(Job, job_id), JobStatus.canceled, reason="test")
            s.rollback() if rollback else s.commit()
    t = threading.Thread(target=run)
    t.start()
    t.join()


def test_a_commit_on_another_thread_wakes_the_waiter_and_a_rollback_does_not(farm):
    engine, blobs, user, _ = farm
    job_id = make_job(engine, blobs, user, "1-2")

    async def main():
        seq = changes.HUB.seq(job_id)
        change_in_thread(engine, job_id, rollback=True)
        assert changes.HUB.seq(job_id) == seq, "a rolled-back change is no change"
        assert await changes.HUB.wait(job_id, seq, 0.2) is False
        waiter = asyncio.create_task(changes.HUB.wait(job_id, seq, NEVER))
        await asyncio.sleep(0.05)
        assert changes.HUB.waiting() == 1
        await asyncio.to_thread(change_in_thread, engine, job_id)
        assert await waiter is True and changes.HUB.seq(job_id) > seq
        assert changes.HUB.waiting() == 0
        # the change came before the wait began (between a stream's read and its wait): not missed
        assert await changes.HUB.wait(job_id, seq, NEVER) is True
    asyncio.run(main())


def test_the_hub_keeps_a_bounded_number_of_jobs():
    hub = changes.JobChanges(keep=3)
    hub.changed(range(1, 11))
    assert [hub.seq(j) for j in range(1, 11)] == [0] * 7 + [8, 9, 10]

    async def main():  # a job forgotten is woken by its next change
        waiter = asyncio.create_task(hub.wait(1, 0, NEVER))
        await asyncio.sleep(0.01)
        hub.changed([1])
        assert await waiter is True
    asyncio.run(main())


def test_a_streams_reads_are_paced_a_burst_then_20_a_second():
    """A job changing without pause (every step) costs one stream at most 20 reads a second after a burst
    of 3: the bound on what a busy job's open pages cost the database."""
    hub = changes.JobChanges()

    async def main():
        follow = changes.Follow(7, hub)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(23):
            hub.changed([7])
            await follow.next()
            if i == 2:
                burst = loop.time() - t0
        return burst, loop.time() - t0
    burst, total = asyncio.run(main())
    assert burst < 0.25, "the first changes are read at once"
    assert total >= (23 - changes.READ_BURST) / changes.READS_PER_SECOND - 0.01


def test_the_event_stream_sends_a_new_output_at_the_step_that_stored_it(farm, monkeypatch):
    """Real uvicorn on loopback (its own thread and loop, as ``farm serve``'s web side), the coordinator's
    step on this thread. The stream would read again only after 60 s by itself (POLL_SECONDS raised): the
    RESULT's commit is what makes it read and send."""
    engine, blobs, user, token = farm
    monkeypatch.setattr(changes, "POLL_SECONDS", 60.0)
    job_id = make_job(engine, blobs, user, "1")
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"w1")
    [task] = of(d.send((b"w1", P.Ready(1))), P.Task, b"w1")
    server = uvicorn.Server(uvicorn.Config(create_app(engine, blobs), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, what="uvicorn started")
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=NEVER) as http, \
                http.stream("GET", f"/api/jobs/{job_id}/events", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status_code == 200
            views = (json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: "))
            assert next(views)["frames_done"] == 0
            d.send((b"w1", P.Result(task.task_id, task.attempt, [output_blob(blobs, 1)], 0.2)))
            view = next(views)
            assert view["frames_done"] == 1 and view["status"] == "rendered", "sent at the commit, not a poll"
    finally:
        server.should_exit = True
        thread.join(10)
