"""A slow worker for the chaos test: the real worker daemon, each task held a while longer (and, with
``--claim``, a dishonest one that pads its tasks and reports more render seconds than it took).

    python -m tests.helpers.slow_worker --delay SECONDS [--claim SECONDS] <the options of `farm worker`>

It runs ``farm worker`` with every executor wrapped: the task waits ``--delay`` seconds (half before
the render, half after it, before its outputs are uploaded) and is otherwise rendered, uploaded and
reported as usual. The daemon keeps heart-beating meanwhile (the wait is an asyncio sleep in its loop).
Why: a tiny frame renders in about 10 ms, so a 100-frame job is over in three seconds, too soon for
anything to go wrong in it; held for a second, each task is a lease that a kill -9 can hit mid-way, before
or after its render, while every pixel still comes from Blender.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from worker.tasks.executors import EXECUTORS, TaskContext


def slow_down(delay: float, claim: float | None = None) -> None:
    for kind, (runtime, executor) in list(EXECUTORS.items()):
        async def slowly(ctx: TaskContext, executor=executor):
            await asyncio.sleep(delay / 2)
            produced = await executor(ctx)
            await asyncio.sleep(delay / 2)
            if claim is not None:  # a dishonest worker: it reports this many render seconds per output
                for p in produced:
                    p.seconds = claim
            return produced
        EXECUTORS[kind] = (runtime, slowly)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.slow_worker",
                                 description="a farm worker that takes --delay seconds longer per task (tests only)")
    ap.add_argument("--delay", type=float, required=True)
    ap.add_argument("--claim", type=float, default=None, help="report this many render seconds per output (a lie)")
    args, rest = ap.parse_known_args(argv)
    slow_down(args.delay, args.claim)
    print(f"slow worker: {args.delay} s more per task", flush=True)
    from client import cli
    return cli.main(["worker", *rest])


if __name__ == "__main__":
    sys.exit(main())
