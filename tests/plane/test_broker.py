"""The broker's batching over a real ROUTER socket on loopback: messages that arrive while a step is
committing are received by the event loop meanwhile, and each is handled once, in the next step."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import zmq
import zmq.asyncio

from common import protocol as P
from common.limits import PROTOCOL_HEADER
from farm.plane.broker import GC_GEN0_THRESHOLD, Broker, tune_gc
from tests.fixtures_inproc import make_engine_and_store, new_coordinator


def test_messages_arriving_during_a_commit_are_drained_meanwhile_and_handled_once(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    coord = new_coordinator(engine, blobs)
    batches: list[int] = []
    step = coord.step

    def recording_step(batch, now=None):
        batches.append(len(batch))
        return step(batch, now)
    coord.step = recording_step
    sent, drained = threading.Event(), []

    async def main():
        ctx = zmq.asyncio.Context()
        broker = Broker(coord, "tcp://127.0.0.1:0", ctx=ctx)
        running = asyncio.create_task(broker.run())
        endpoint = await broker.ready()
        tell_broker = coord.on_commit
        committing = threading.Event()

        def slow_commit():  # the first commit waits for the messages, then lets the loop drain them
            if not committing.is_set():
                committing.set()
                assert sent.wait(10)
                time.sleep(0.2)  # they reach the ROUTER's queue
                tell_broker()
                time.sleep(0.3)  # the loop drains them while this step "commits"
                drained.append(len(broker._early))
        coord.on_commit = slow_commit
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        try:
            await dealer.send_multipart([PROTOCOL_HEADER, b"\xff", b""])  # the step that will commit slowly
            await asyncio.get_running_loop().run_in_executor(None, committing.wait, 10)
            for i in range(30):  # malformed: each gets its own ERROR
                await dealer.send_multipart([PROTOCOL_HEADER, b"\xfe", str(i).encode()])
            sent.set()
            replies = [P.decode(await asyncio.wait_for(dealer.recv_multipart(), 10)) for _ in range(31)]
            assert not await dealer.poll(300), "one reply per message, no more"
        finally:
            dealer.close(0)
            broker.stop()
            await asyncio.wait_for(running, 10)
            ctx.destroy(linger=0)
        return replies

    replies = asyncio.run(main())
    assert drained == [30], "the loop received the 30 messages while the step committed"
    assert batches[:2] == [1, 30], "and they were the next step's batch"
    assert all(isinstance(m, P.Error) and "malformed" in m.reason for m in replies)
    assert coord.stats["malformed"] == 31 and coord.on_commit is None


class _Node:
    me: object = None


def test_tune_gc_freezes_the_start_up_heap_and_collects_young_objects_less_often():
    before_threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000 and gc.get_threshold()[0] == GC_GEN0_THRESHOLD
        node = _Node()
        node.me = node  # a cycle made after start-up: still collected
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before_threshold)
