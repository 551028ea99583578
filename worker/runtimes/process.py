"""Parent-side handle of one long-lived runtime child process (asyncio).

The worker daemon never imports bpy or torch: each heavy runtime (Blender
now, a diffusion pipeline later) runs as `python -m <module> <args>` and
speaks JSON lines with this class:

- the child writes `{"event": "ready", ...}` once it is usable;
- each request is one JSON object on the child's stdin; `request()` assigns
  its "id" and yields every event carrying that id until a terminal one
  ("done", "error" or "pong");
- the child's stderr (Blender's chatter, tracebacks) goes to a log file in
  the workdir, whose tail is attached to `RuntimeCrashed`.

Invariants: at most one request in flight per child (an asyncio.Lock); a
child that exits while a request or start() waits on it raises
RuntimeCrashed promptly (EOF on its stdout), never hangs. Timeouts and
cancellation are the caller's: wrap the iteration in asyncio.timeout() and
call kill().
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"done", "error", "pong"})
STREAM_LIMIT = 64 * 1024 * 1024      # one reply line may list many outputs
LOG_TAIL_BYTES = 16 * 1024
LOG_TAIL_LINES = 40
# The project root, so `-m worker.…` resolves whatever the daemon's cwd is.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class RuntimeCrashed(RuntimeError):
    """The child exited (or could not be talked to) while we waited on it."""

    def __init__(self, returncode: int | None, stderr_tail: str, what: str = "runtime"):
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        how = (f"killed by signal {-returncode}" if returncode is not None and returncode < 0
               else f"exit code {returncode}")
        super().__init__(f"{what} process died ({how}); last stderr lines:\n{stderr_tail}")


class RuntimeProcess:
    def __init__(self, module: str, args: list[str], workdir: Path, *,
                 env: dict[str, str] | None = None, log_stderr: bool = True):
        self.module = module
        self.args = list(args)
        self.workdir = Path(workdir)
        self.extra_env = dict(env or {})
        self.log_stderr = log_stderr
        self.log_path = self.workdir / "runtime.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    # ---- lifecycle ------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float = 120) -> dict:
        """Spawn the child and return its "ready" event."""
        if self.alive:
            raise RuntimeError("runtime already started")
        user, cache = self.workdir / "blender_user", self.workdir / "xdg_cache"
        for d in (user, cache):
            d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Keep Blender (and mesa, and anything using XDG) out of $HOME and
        # away from a stray userpref.blend.
        env.update(BLENDER_USER_RESOURCES=str(user), XDG_CACHE_HOME=str(cache),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])))
        env.update(self.extra_env)
        stderr = None
        if self.log_stderr:
            stderr = open(self.log_path, "ab")  # append: earlier crashes stay readable
            stderr.write(f"---- start {self.module} {' '.join(self.args)}\n".encode())
            stderr.flush()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, *self.args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                cwd=self.workdir, env=env, limit=STREAM_LIMIT)
        finally:
            if stderr is not None:
                stderr.close()              # the child holds its own copy
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self._next_event()
                    if event.get("event") == "ready":
                        self.ready = event
                        return event
                    log.warning("runtime %s: unexpected event before ready: %r", self.module, event)
        except BaseException:
            await self.kill()
            raise

    async def kill(self) -> None:
        """SIGKILL the child (if running) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    async def stop(self, timeout: float = 10) -> int | None:
        """Ask the child to quit; kill it if it has not exited after `timeout`."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b'{"op": "quit"}\n')
                await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("runtime %s (pid %s) ignored quit; killing it", self.module, proc.pid)
        await self.kill()
        return proc.returncode

    # ---- requests -------------------------------------------------------
    async def request(self, payload: dict) -> AsyncIterator[dict]:
        """Send one request and yield its events up to the terminal one.

        Events of other ids (left over from an abandoned earlier request)
        are skipped. Raises RuntimeCrashed if the child dies meanwhile. A
        caller that stops iterating before the terminal event should close
        the generator (`contextlib.aclosing`) or kill the child.
        """
        await self._lock.acquire()
        locked = True
        try:
            if not self.alive:
                raise await self._crashed()
            rid = next(self._ids)
            line = json.dumps({**payload, "id": rid}).encode() + b"\n"
            try:
                self.proc.stdin.write(line)
                await self.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                raise await self._crashed() from None
            while True:
                event = await self._next_event()
                if event.get("id") != rid:
                    log.debug("runtime %s: dropping stale event %r", self.module, event)
                    continue
                if event.get("event") in TERMINAL_EVENTS:
                    # Release before the last yield: a caller that raises on
                    # "error" (leaving the generator unfinished) must not keep
                    # the child locked until the generator is garbage-collected.
                    self._lock.release()
                    locked = False
                    yield event
                    return
                yield event
        finally:
            if locked:
                self._lock.release()

    async def _next_event(self) -> dict:
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except (asyncio.LimitOverrunError, ValueError) as e:   # a line over STREAM_LIMIT
                await self.kill()
                raise RuntimeCrashed(self.proc.returncode, f"protocol line too long: {e}") from None
            if not raw:                     # EOF: the child is gone (or closed its end)
                raise await self._crashed()
            try:
                event = json.loads(raw)
            except ValueError:
                log.warning("runtime %s: non-JSON line on protocol stream: %r", self.module, raw[:200])
                continue
            if isinstance(event, dict):
                return event

    async def _crashed(self) -> RuntimeCrashed:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            # EOF on stdout but still running: it closed the protocol fd,
            # which is as broken as dead. Give it a moment, then make sure.
            try:
                await asyncio.wait_for(proc.wait(), 2)
            except TimeoutError:
                await self.kill()
        return RuntimeCrashed(proc.returncode if proc else None, self.stderr_tail(), self.module)

    def stderr_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_stderr:
            return "(stderr not captured)"
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no stderr log)"
        return "\n".join(text.splitlines()[-lines:])
