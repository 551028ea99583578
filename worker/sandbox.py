"""The OS sandbox every runtime child runs in: what a stranger's scene or model can touch on this host.

A runtime child (Blender, diffusion) is started as ``bwrap … -- [setpriv …] prlimit … -- python -m …``
from a declared :class:`Policy`:

* **filesystem**: an empty root; read-only binds of the system (``/usr`` and the loader's files in
  ``/etc``), the Python interpreter and virtual environment, the project's ``common`` and ``worker``
  packages, and the model folders the worker holds; read-write only the child's own folder, in which
  ``inputs/`` (the task's input blobs, staged by the daemon) is bound read-only again. The worker's
  cache, keys, configuration and home, the coordinator's data and every other path are not there at all;
  ``/tmp`` and ``/dev/shm`` are private tmpfs.
* **network**: its own network namespace with only a loopback of its own (bubblewrap's
  ``--unshare-net``), and seccomp refuses IPv4, IPv6 and packet sockets outright.
* **privilege**: a worker running as root starts the child under an unprivileged uid of its own
  (``SANDBOX_UID_BASE`` + slot; ``setpriv``, every capability and the bounding set dropped); any other
  worker starts it in a user namespace. (A root worker whose model folders only root may read starts its
  diffusion children in a user namespace too: uid 0 there, without any capability, and seeing nothing but
  what is bound in; ``RLIMIT_NPROC`` does not bind uid 0, so their thread limit is not enforced.)
  Either way ``no_new_privs`` is set (bubblewrap always does), the
  pid, IPC, UTS and cgroup namespaces are new, and the seccomp filter below refuses what rendering never
  needs (ptrace, mount, namespaces, kexec, bpf, module loading, keyrings, perf, reboot, …).
* **resources**: ``RLIMIT_DATA`` (memory: the heap and every private writable mapping — unlike
  ``RLIMIT_AS`` it leaves CUDA's huge ``PROT_NONE`` reservations alone, so GPU runtimes work under it),
  ``RLIMIT_FSIZE`` (largest file written), ``RLIMIT_NPROC`` (processes and threads: counted per user in
  the child's own user namespace, or for the child's own uid), ``RLIMIT_NOFILE``, no core files; the
  daemon adds wall-clock and CPU-time limits per task (:mod:`worker.runtimes.process`).
* **environment**: built from nothing: ``PATH``, ``HOME`` (the child's folder), locale, the runtime's
  own variables and the worker's tunables (``RENDERHIVE_<NAME>`` of :mod:`worker.settings` and
  :mod:`common.limits`); no token, key or other secret of the worker's environment.
* **GPU**: ``/dev/nvidia*`` and ``/dev/dri`` are bound where present (the driver's libraries are under
  ``/usr``), and ``/sys`` read-only, so CUDA/OptiX and the diffusion runtime work inside.

bubblewrap (Debian's ``bubblewrap``, what Flatpak uses) builds the namespaces and mounts; the filter is
compiled by libseccomp (through ``pyseccomp``) and handed to bubblewrap, which installs it just before the
child's program runs. Nothing here is home-made security: this module only declares the policy.
:func:`probe` checks at worker start that all of it works on this host, and says what to install if not.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common import limits as L
from worker import settings as C

SANDBOX_UID_BASE = 61000
"""A root worker runs slot N's children as uid/gid SANDBOX_UID_BASE + N: unprivileged, owning nothing on
the host but the child's own folder, and apart from every other slot (one child cannot signal another)."""

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHILD_PACKAGES = ("common", "worker")
"""The project's packages a runtime child imports (``farm``, ``client`` and the tests stay outside)."""

DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "fspick", "mount_setattr", "unshare", "setns", "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "acct", "quotactl",
    "swapon", "swapoff", "syslog", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "iopl", "ioperm", "lookup_dcookie", "vhangup", "nfsservctl",
    "fanotify_init", "personality",
)
"""System calls refused with EPERM: none is needed to render or to run a diffusion model."""

DENIED_SOCKET_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_PACKET)
"""Socket families refused with EACCES (the child has no network anyway; this is the second wall)."""

CLONE_NAMESPACES = 0x7E020000
"""CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: clone() with any is refused."""


class SandboxUnavailable(RuntimeError):
    """This host cannot run the sandbox; the message says what to install or allow."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one runtime child (see the module docstring)."""
    memory_bytes: int = C.SANDBOX_MEMORY_BYTES
    file_bytes: int = C.SANDBOX_FILE_BYTES
    processes: int = C.SANDBOX_PROCESSES
    open_files: int = 4096


@dataclass(frozen=True)
class Policy:
    """What one runtime child may see and use."""
    workdir: Path                                   # its own folder: the only writable place
    readonly: tuple[Path, ...] = ()                 # extra read-only paths (the worker's model folders)
    limits: Limits = field(default_factory=Limits)
    uid: int | None = None                          # a root worker's unprivileged uid for this child

    @property
    def inputs(self) -> Path:
        """Where the daemon stages a task's input blobs (read-only inside)."""
        return self.workdir / "inputs"


def _env_names() -> set[str]:
    """The worker's tunables a child may read (never a token or key: those are not settings)."""
    names = {n for n in dir(C) if n.isupper()} | {n for n in dir(L) if n.isupper()}
    return {f"RENDERHIVE_{n}" for n in names}


PASS_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
            "TZ")
"""Variables of the worker's environment a child inherits as they are: device selection and thread counts."""


def child_env(policy: Policy, extra: dict[str, str]) -> dict[str, str]:
    """The child's whole environment: built from nothing, so no secret of the worker's can leak in."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(policy.workdir), "LANG": "C.UTF-8",
           "TMPDIR": "/tmp", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": str(PROJECT_ROOT), "RENDERHIVE_SANDBOXED": "1"}
    allowed = _env_names()
    env.update({k: v for k, v in os.environ.items() if k in PASS_ENV or k in allowed})
    env.update(extra)
    return env


def seccomp_program() -> bytes:
    """The seccomp filter as a BPF program (libseccomp compiles it; bubblewrap installs it)."""
    try:
        import pyseccomp as seccomp
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    except (ImportError, OSError, RuntimeError) as exc:
        raise SandboxUnavailable(f"libseccomp cannot be loaded ({exc}): install it (Debian: apt-get install "
                                 "libseccomp2) and reinstall the worker (pip install renderhive)") from None
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):  # a call this kernel or architecture does not have
            pass
    for family in DENIED_SOCKET_FAMILIES:
        f.add_rule(seccomp.ERRNO(errno.EACCES), "socket", seccomp.Arg(0, seccomp.EQ, int(family)))
    f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NAMESPACES,
                                                                CLONE_NAMESPACES))
    for bit in (0x10000000, 0x20000000, 0x40000000, 0x02000000, 0x04000000, 0x08000000, 0x00020000):
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, bit, bit))
    # clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes libc fall back to clone
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def _gpu_binds() -> list[str]:
    args = []
    for dev in sorted(Path("/dev").glob("nvidia*")) + [Path("/dev/dri")]:
        if dev.exists():
            args += ["--dev-bind", str(dev), str(dev)]
    return args


def _system_binds() -> list[str]:
    """Read-only system paths: /usr (merged-/usr hosts link /bin, /lib… into it) and the loader's files."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / top
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    # Not nsswitch.conf: with it, glibc loads the host's NSS modules for a user lookup (libnss_systemd…),
    # which crashed bpy's import here (SIGSEGV); without it, lookups read the (absent) /etc/passwd only.
    for etc in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "ssl/certs", "fonts",
                "OpenCL", "vulkan", "glvnd", "nvidia"):
        args += ["--ro-bind-try", f"/etc/{etc}", f"/etc/{etc}"]
    return args + ["--ro-bind-try", "/sys", "/sys"]


def _python_binds() -> list[str]:
    """The interpreter, the virtual environment and the project's packages, read-only at their own paths."""
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).parent.resolve()}
    paths |= {PROJECT_ROOT / p for p in CHILD_PACKAGES}
    args = []
    for p in sorted(paths):
        if not str(p).startswith("/usr/"):
            args += ["--ro-bind", str(p), str(p)]
    return args


def _parents(targets: list[str]) -> list[str]:
    """Create the folders above the bind targets as 0755 (bubblewrap would make them 0700 as root, and the
    child's uid could not reach its own files): the host's modes of those folders do not matter inside."""
    made, args = set(), []
    for target in targets:
        for parent in reversed(Path(target).parents[:-1]):
            s = str(parent)
            if s not in made and s not in targets and not s.startswith("/usr"):
                made.add(s)
                args += ["--perms", "0755", "--dir", s]
    return args


def command(policy: Policy, argv: list[str], seccomp_fd: int, bwrap: str = "bwrap") -> list[str]:
    """The full command line that runs ``argv`` (``[python, "-m", module, …]``) inside ``policy``."""
    w = str(policy.workdir)
    args = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "renderhive-sandbox"]
    if policy.uid is None:
        args += ["--unshare-user", "--cap-drop", "ALL"]
    else:  # a root worker: setpriv drops to the child's own uid, which ends every capability (these three
        # serve bubblewrap's chdir into the child's folder and setpriv alone; setpriv is the only program run with them)
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                 "--cap-add", "CAP_DAC_OVERRIDE"]
    binds = _python_binds()
    for p in policy.readonly:
        binds += ["--ro-bind", str(p), str(p)]
    binds += ["--bind", w, w, "--ro-bind", str(policy.inputs), str(policy.inputs)]
    # /tmp first: a child's folder may lie under the host's /tmp (tests), and is bound over the tmpfs
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp",
             "--perms", "1777", "--tmpfs", "/dev/shm"] + _gpu_binds()
    system = _system_binds()
    targets = [system[i + 2] for i, a in enumerate(system) if a in ("--ro-bind", "--ro-bind-try")]
    args += _parents(targets + binds[2::3]) + system + binds
    args += ["--chdir", w, "--seccomp", str(seccomp_fd), "--"]
    if policy.uid is not None:
        args += ["setpriv", f"--reuid={policy.uid}", f"--regid={policy.uid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    lim = policy.limits
    args += ["prlimit", f"--data={lim.memory_bytes}", f"--fsize={lim.file_bytes}", f"--nproc={lim.processes}",
             f"--nofile={lim.open_files}", "--core=0", "--"]
    return args + argv


def prepare(policy: Policy) -> None:
    """Create the child's folder (and ``inputs/``); a root worker gives it to the child's uid."""
    policy.inputs.mkdir(parents=True, exist_ok=True)
    if policy.uid is not None:
        for dirpath, dirnames, filenames in os.walk(policy.workdir):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                if os.path.realpath(name).startswith(str(policy.inputs)):
                    continue  # staged inputs stay the worker's: read-only to the child, also by owner
                os.lchown(name, policy.uid, policy.uid)
        os.chmod(policy.workdir, 0o700)


def give(policy: Policy, path: Path) -> None:
    """Hand a folder the daemon made inside the child's folder (a task's output folder) to the child."""
    if policy.uid is not None:
        os.chown(path, policy.uid, policy.uid)


def world_readable(folder: Path) -> bool:
    """Whether every file under ``folder`` is readable by any user (an unprivileged uid can load it)."""
    for dirpath, _dirs, files in os.walk(folder, followlinks=True):
        for name in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            try:
                mode = os.stat(name).st_mode
            except OSError:
                return False
            if not mode & 0o004 or (os.path.isdir(name) and not mode & 0o001):
                return False
    return True


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def probe(bwrap: str | None = None) -> str:
    """Check that the sandbox works here (bubblewrap, namespaces, seccomp); its description, or raise
    :class:`SandboxUnavailable` with what to do."""
    bwrap = bwrap or find_bwrap()
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap is not installed: install it (Debian/Ubuntu: apt-get install "
                                 "bubblewrap; Fedora: dnf install bubblewrap), or run the worker with "
                                 "--no-sandbox to let strangers' scenes touch this machine")
    program = seccomp_program()
    with tempfile.TemporaryDirectory(prefix="rh-sandbox-probe-") as d:
        policy = Policy(Path(d), uid=SANDBOX_UID_BASE if os.geteuid() == 0 else None)
        prepare(policy)
        r, w = os.pipe()
        os.write(w, program)
        os.close(w)
        try:
            res = subprocess.run(command(policy, [sys.executable, "-c", "print('ok')"], r, bwrap),
                                 pass_fds=(r,), env=child_env(policy, {}), capture_output=True, text=True,
                                 timeout=60)
        finally:
            os.close(r)
    if res.returncode != 0 or res.stdout.strip() != "ok":
        why = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SandboxUnavailable(f"the sandbox cannot start on this host ({why[0]}): allow unprivileged user "
                                 "namespaces (sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04 "
                                 "an AppArmor profile for bwrap), or run the worker with --no-sandbox")
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
    mode = f"uid {SANDBOX_UID_BASE}+slot" if os.geteuid() == 0 else "user namespace"
    return f"{out}, seccomp, {mode}"
