"""PostgreSQL for the tests: Debian's server, a throwaway cluster in a temporary directory on a loopback port.

``make postgres`` (a dependency of ``make test``, so of ``.ci/run``) installs Debian's ``postgresql``
package when its server binaries are missing; ``PG_BINDIR`` may point at another ``bin`` folder. The
cluster is started on demand by the session fixture ``postgres`` (conftest) and stopped by its finalizer,
or at interpreter exit: ``initdb`` and the server refuse to run as root, so under root they run as the
package's ``postgres`` account (or ``nobody``). It listens on 127.0.0.1 only, trusts local connections
and skips fsync: it holds test data and nothing else. Each test gets its own database (``CREATE DATABASE
… TEMPLATE template0``), dropped at the end with any connection still open to it.

A cluster left behind by a test run that was killed (no finalizer ran) is stopped and removed by the next
start: each cluster's folder names the pid of the process that started it.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from client.localfarm import free_port

PREFIX = "renderhive-pg-"
INSTALL_HINT = ("PostgreSQL's server is not installed: run `make postgres` (it runs `apt-get install "
                "postgresql`, as root or with sudo), or set PG_BINDIR to the folder holding initdb and pg_ctl")
SERVER_OPTIONS = ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                  "-c", "full_page_writes=off", "-c", "max_connections=300"]


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started; the message says what to do."""


def find_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: PG_BINDIR, PATH (resolved: Debian's are links), or the newest
    /usr/lib/postgresql/N/bin."""
    cands = [os.environ.get("PG_BINDIR"), shutil.which("pg_ctl") and str(Path(shutil.which("pg_ctl")).resolve().parent)]
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for cand in [*cands, *map(str, versions)]:
        if cand and all(os.access(Path(cand) / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(cand)
    return None


def _account() -> pwd.struct_passwd | None:
    """Whom to run the server as: ourselves, unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither a 'postgres' nor a 'nobody' account exists to run "
                              "PostgreSQL as (it refuses root): create one with `useradd --system postgres`")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PgServer:
    def __init__(self, bindir: Path, account: pwd.struct_passwd | None = None, options: list[str] | None = None):
        self.bindir, self.account = bindir, account
        self.options = SERVER_OPTIONS if options is None else options  # bench/databases.py: durable settings
        self.root: Path | None = None
        self.port = 0
        self.names = itertools.count(1)

    # ------------------------------------------------------------------ processes
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        extra = {}
        if self.account is not None:
            extra = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.root)}
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=timeout, **extra)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def start(self) -> "PgServer":
        remove_stale()
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        if self.account is not None:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)
        atexit.register(self.stop)
        res = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                        "--locale=C", "--no-sync")
        if res.returncode:
            raise PostgresUnavailable(f"initdb failed:\n{res.stdout[-1500:]}{res.stderr[-1500:]}")
        for _ in range(5):  # a free port can be taken between our probe and the server's bind: try another
            self.port = free_port()
            opts = " ".join([*self.options, "-p", str(self.port), "-k", str(self.root)])
            res = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts,
                            "start")
            if res.returncode == 0:
                return self
        raise PostgresUnavailable(f"pg_ctl start failed:\n{res.stderr[-1000:]}\n{self.tail()}")

    def stop(self) -> None:
        """Stop the server (immediate: its data is thrown away) and remove its folder. Idempotent."""
        if self.root is None or not self.root.exists():
            return
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ databases
    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self.url(driver="postgresql"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = f"test_{next(self.names)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing any connection a test left open to it (an engine it did not dispose)."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def remove_stale() -> None:
    """Stop and remove clusters whose starting process is gone (a test run killed before its finalizer)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        m = re.match(rf"{PREFIX}(\d+)-", folder.name)
        if not m or _alive(int(m.group(1))):
            continue
        try:
            pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
            if b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a pid reused since
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        except (OSError, ValueError, IndexError):
            pass
        shutil.rmtree(folder, ignore_errors=True)


def start_server(options: list[str] | None = None) -> PgServer:
    """A started cluster, or :class:`PostgresUnavailable` saying how to get one. ``options``: the server's
    ``-c`` settings instead of SERVER_OPTIONS (the test settings: no fsync)."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(INSTALL_HINT)
    return PgServer(bindir, _account(), options).start()
