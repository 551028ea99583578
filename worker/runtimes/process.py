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
import time
from collections.abc import AsyncIterator
from pathlib import Path

from worker import sandbox
from worker.sandbox import Policy

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"done", "error", "pong"})
STREAM_LIMIT = 64 * 1024 * 1024      # one reply line may list many outputs
LOG_TAIL_BYTES = 16 * 1024
LOG_TAIL_LINES = 40
MEMORY_SIGNS = ("memoryerror", "out of memory", "cannot allocate memory", "bad_alloc", "not enough memory",
                "malloc returns null", "calloc returns null")
"""What Blender, Python and torch print when an allocation fails (under the sandbox's RLIMIT_DATA)."""
THREAD_SIGNS = ("can't start new thread", "resource temporarily unavailable", "pthread_create")
"""What they print when a thread or process cannot start (RLIMIT_NPROC)."""
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
                 env: dict[str, str] | None = None, log_stderr: bool = True, sandbox: Policy | None = None):
        self.module = module
        self.args = list(args)
        self.workdir = Path(workdir)
        self.sandbox = sandbox              # None: the child runs unconfined (``farm worker --no-sandbox``)
        if sandbox is not None and Path(sandbox.workdir) != self.workdir:
            raise ValueError("a sandboxed runtime's folder is its policy's workdir")
        self.extra_env = dict(env or {})
        self.log_stderr = log_stderr
        self.log_path = self.workdir / "runtime.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self.limit_hit = ""
        self.peak_data = 0
        self.marks: list[dict] = []  # the last request's per-frame timing marks (worker.pipeline.PhaseLog)
        self.reported_rss: int | None = None  # the resident size the child reported with its last "done"

    # ---- lifecycle ------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def host_pid(self) -> int | None:
        """The pid of the runtime itself: in a sandbox, the last of bubblewrap's descendants."""
        pid = self.pid
        if pid is None or self.sandbox is None:
            return pid
        for _ in range(4):          # bwrap → bwrap (the namespace's init) → the runtime (setpriv, prlimit exec)
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                return pid
            if not kids:
                return pid
            pid = int(kids[-1])
        return pid

    def usage(self) -> tuple[float, int, int]:
        """(CPU seconds, data bytes, resident bytes) the runtime has used so far (0s when unknown)."""
        pid = self.host_pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, TypeError, IndexError):
            return 0.0, 0, 0
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        kb = {l.split(":")[0]: int(l.split()[1]) for l in status.splitlines() if l.startswith(("VmData", "VmRSS"))}
        return cpu, kb.get("VmData", 0) * 1024, kb.get("VmRSS", 0) * 1024

    async def watch(self, wall_seconds: float, cpu_seconds: float, interval: float = 0.25) -> None:
        """Stop the runtime when the request in flight passes its wall-clock or CPU-time limit; notes the
        peak data size meanwhile (``peak_data``), and why it stopped it (``limit_hit``). Run beside the
        request; cancel it when the request ends."""
        start, cpu0 = time.monotonic(), self.usage()[0]
        self.peak_data = 0
        while self.alive:
            await asyncio.sleep(interval)
            cpu, data, _rss = self.usage()
            self.peak_data = max(self.peak_data, data)
            if time.monotonic() - start > wall_seconds:
                self.limit_hit = f"it ran longer than the job's limit of {wall_seconds:g} s"
            elif cpu - cpu0 > cpu_seconds:
                self.limit_hit = f"it used more than the job's limit of {cpu_seconds:g} s of CPU time"
            if self.limit_hit:
                await self.kill()
                return

    async def start(self, timeout: float = 120) -> dict:
        """Spawn the child and return its "ready" event."""
        if self.alive:
            raise RuntimeError("runtime already started")
        user, cache = self.workdir / "blender_user", self.workdir / "xdg_cache"
        for d in (user, cache):
            d.mkdir(parents=True, exist_ok=True)
        # Keep Blender (and mesa, and anything using XDG) out of $HOME and
        # away from a stray userpref.blend.
        own = dict(BLENDER_USER_RESOURCES=str(user), XDG_CACHE_HOME=str(cache))
        argv = [sys.executable, "-m", self.module, *self.args]
        pass_fds: tuple[int, ...] = ()
        if self.sandbox is not None:
            sandbox.prepare(self.sandbox)
            env = sandbox.child_env(self.sandbox, {**own, **self.extra_env})
            r, w = os.pipe()            # the seccomp program, read by bubblewrap (136 bytes: fits a pipe)
            os.write(w, sandbox.seccomp_program())
            os.close(w)
            argv, pass_fds = sandbox.command(self.sandbox, argv, r), (r,)
        else:
            env = dict(os.environ)
            env.update(own, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])))
            env.update(self.extra_env)
        self.limit_hit = ""             # why the daemon stopped the child, when it did (a sandbox limit)
        self.peak_data = 0              # the largest data size seen by watch()
        stderr = None
        if self.log_stderr:
            stderr = open(self.log_path, "ab")  # append: earlier crashes stay readable
            stderr.write(f"---- start {self.module} {' '.join(self.args)}\n".encode())
            stderr.flush()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                cwd=self.workdir, env=env, limit=STREAM_LIMIT, pass_fds=pass_fds)
        finally:
            if stderr is not None:
                stderr.close()              # the child holds its own copy
            for fd in pass_fds:
                os.close(fd)
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
            self.marks, self.reported_rss = [], None
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
                if "marks" in event:
                    self.marks.append({"frame": event.get("frame"), "marks": event.pop("marks"), "at": time.time()})
                if event.get("event") in TERMINAL_EVENTS:
                    rss = event.get("rss_bytes")
                    self.reported_rss = rss if type(rss) is int and rss >= 0 else None
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

    def limit_reason(self, crash: RuntimeCrashed) -> str:
        """Why the child died when it was a sandbox limit (the scene's doing, not the worker's), else "".
        Said so that the creator knows what to change."""
        if self.limit_hit:
            return self.limit_hit
        if self.sandbox is None:
            return ""
        lim, tail = self.sandbox.limits, crash.stderr_tail.lower()
        gib = lim.memory_bytes / 1024**3
        if crash.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "file too large" in tail:
            return (f"it wrote a file larger than this worker's limit of {lim.file_bytes / 1024**3:.1f} GiB "
                    "(lower the resolution or use a compressed format)")
        if self.peak_data > 0.8 * lim.memory_bytes or any(m in tail for m in MEMORY_SIGNS):
            return (f"the scene needs more than {gib:.1f} GiB of memory, this worker's limit (simplify it, lower "
                    "the resolution, subdivision or particle counts, or ask for workers with more memory)")
        if any(m in tail for m in THREAD_SIGNS):
            return (f"it started more than {lim.processes} processes or threads, this worker's limit")
        return ""

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
