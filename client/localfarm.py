"""Start a coordinator and workers as local processes on loopback (the demo, the tests, the benchmarks).

Each process runs ``python -m client.cli …`` (or another module, e.g. a test's modified worker) in its own process group (so a kill reaches its Blender
children, as a crash would), logs to a file, and is stopped with SIGTERM (SIGKILL after a grace period).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from client.api import ApiError, Client  # noqa: F401  (ApiError re-exported for callers)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: bound all at once, so none is handed out twice (two calls of
    :func:`free_port` can return the same port: the kernel reuses the one just released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(predicate: Callable, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("RENDERHIVE_URL", None)
    env.pop("RENDERHIVE_TOKEN", None)
    return env


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, module: str = "client.cli"):
        self.args, self.log, self.env, self.module = args, Path(log), env or process_env(), module
        self.p: subprocess.Popen | None = None
        self.launcher: list[str] = []  # a command that runs Python, e.g. ["ip", "netns", "exec", NAME]

    def start(self) -> "Proc":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            self.p = subprocess.Popen([*self.launcher, sys.executable, "-m", self.module, *self.args], cwd=REPO,
                                      env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL, grace: float = 20.0) -> None:
        """Signal the whole process group and wait for it (SIGKILL after ``grace`` seconds)."""
        if not self.alive:
            return
        try:
            os.killpg(self.p.pid, sig)
            self.p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Coordinator(Proc):
    """`farm serve` with its data in ``root/data``, on the given (or free) loopback ports; ``db``: a database
    URL (``--db``; default: SQLite in the data dir); ``host``: the address both planes bind to (another
    than loopback for a coordinator in a network namespace, tests/netns.py); ``admit``: ``--admit``
    (default: open on loopback, token elsewhere). Its CurveZMQ key and enrollment token are files in the
    data dir, which :class:`WorkerProc` hands to its workers."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, zmq_port: int | None = None,
                 http_port: int | None = None, db: str | None = None, host: str = "127.0.0.1",
                 admit: str | None = None):
        self.root = Path(root)
        self.data = self.root / "data"
        self.server_key_file = self.data / "curve" / "server.key"    # written by farm serve on first start
        self.enroll_token_file = self.data / "curve" / "enroll.token"
        spare = iter(p for p in free_ports(4) if p not in (zmq_port, http_port))
        self.zport = zmq_port or next(spare)
        self.hport = http_port or next(spare)
        self.sport = next(spare)  # the sealed blob server's
        self.endpoint = f"tcp://{host}:{self.zport}"
        self.url = f"http://{host}:{self.hport}"
        super().__init__(["serve", "--data", str(self.data), "--bind", self.endpoint,
                          "--http", f"{host}:{self.hport}", "--sealed", f"{host}:{self.sport}",
                          *(["--db", db] if db else []),
                          *(["--admit", admit] if admit else [])],
                         self.root / "serve.log", env)

    def start(self, timeout: float = 30.0) -> "Coordinator":
        super().start()

        def up():
            if not self.alive:
                raise RuntimeError(f"farm serve exited:\n{self.tail()}")
            try:
                return Client(self.url, "", timeout=2).health()
            except ApiError:
                return None
        wait_for(up, timeout, what="farm serve to answer /api/health")
        return self

    @property
    def admin(self) -> Client:
        return Client(self.url, (self.data / "admin.token").read_text().strip())

    def creator(self, name: str) -> Client:
        return Client(self.url, self.admin.create_user(name)["token"])


class WorkerProc(Proc):
    """`farm worker` with its cache in ``root``, connected to ``coordinator``, pinning its key and
    presenting its enrollment token (the files in its data dir, read when the worker starts).

    ``extra_args`` go after the usual options (e.g. ``["--no-benchmark"]``). ``module`` and ``argv_prefix``
    replace ``python -m client.cli worker`` by another program taking the same options, e.g.
    ``module="tests.helpers.cheater", argv_prefix=["--mode", "black"]``."""

    def __init__(self, root: Path, coordinator: Coordinator, worker_id: str, env: dict[str, str] | None = None,
                 slots: int = 1, gpus: str = "all", models: list[Path] | None = None,
                 extra_args: list[str] | None = None, module: str = "client.cli",
                 argv_prefix: list[str] | None = None):
        self.root, self.worker_id = Path(root), worker_id
        prefix = ["worker"] if argv_prefix is None else list(argv_prefix)
        super().__init__([*prefix, "--coordinator", coordinator.endpoint, "--cache", str(root), "--slots",
                          str(slots), "--worker-id", worker_id, "--gpus", gpus,
                          "--server-key", str(coordinator.server_key_file),
                          "--enroll-token", str(coordinator.enroll_token_file),
                          *(a for m in models or [] for a in ("--models", str(m))), *(extra_args or [])],
                         self.root / "worker.log", env, module)


def wait_workers(client: Client, n: int, timeout: float = 60.0) -> list[dict]:
    return wait_for(lambda: [w for w in client.workers() if w["online"]] if
                    len([w for w in client.workers() if w["online"]]) >= n else None,
                    timeout, what=f"{n} workers online")
