"""The sandbox mechanism itself (worker/sandbox.py), apart from Blender: a small Python program started by
the same launcher as the runtime children tries to break out, and each attempt must fail on the host.

Every test checks outcomes on the host (files that must not exist or change, a listening socket that
receives nothing), not just the error the program saw.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker import sandbox
from worker.sandbox import Limits, Policy


@pytest.fixture
def host(tmp_path):
    """A worker's cache as it lies on disk: a secret key file beside the runtime child's folder."""
    cache = tmp_path / "cache"
    (cache / "curve").mkdir(parents=True)
    key = cache / "curve" / "worker.key_secret"
    key.write_text("secret-key = \"TOP-SECRET-CURVE-KEY\"\n")
    os.chmod(key, 0o600)
    work = cache / "runtime" / "blender-slot0"
    work.mkdir(parents=True)
    return {"cache": cache, "key": key, "work": work}


def run(policy: Policy, code: str, env: dict[str, str] | None = None, timeout: float = 60) -> dict:
    """Run ``code`` in ``policy``'s sandbox; it prints one JSON object, returned here."""
    sandbox.prepare(policy)
    r, w = os.pipe()
    os.write(w, sandbox.seccomp_program())
    os.close(w)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        argv = sandbox.command(policy, [sys.executable, "-c", textwrap.dedent(code)], r)
        res = subprocess.run(argv, pass_fds=(r,), env=sandbox.child_env(policy, {}), capture_output=True,
                             text=True, timeout=timeout)
    finally:
        os.close(r)
        os.environ.clear()
        os.environ.update(old)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def policy_for(host, **limits) -> Policy:
    uid = sandbox.SANDBOX_UID_BASE if os.geteuid() == 0 else None
    return Policy(host["work"], limits=Limits(**limits) if limits else Limits(), uid=uid)


def test_the_workers_key_and_home_are_invisible(host):
    out = run(policy_for(host), f"""
        import json, os
        seen = {{}}
        for p in [{str(host['key'])!r}, {str(host['cache'])!r}, os.path.expanduser("~root"), "/root/.ssh",
                  "/etc/shadow", "/etc/passwd", "/proc/1/environ"]:
            try:
                seen[p] = "read" if os.path.isfile(p) and open(p).read(1) is not None else os.listdir(p)
            except OSError as e:
                seen[p] = type(e).__name__
        print(json.dumps(seen))
    """)
    assert out[str(host["key"])] == "FileNotFoundError", out
    assert out[str(host["cache"])] == ["runtime"], out  # only the way down to its own folder: no keys, no blobs
    assert out["/etc/shadow"] == "FileNotFoundError" and out["/etc/passwd"] == "FileNotFoundError", out
    assert out["/proc/1/environ"] in ("PermissionError", "read"), out  # pid 1 is the sandbox's own init


def test_no_network_and_no_ip_sockets(host):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    out = run(policy_for(host), f"""
        import json, socket
        res = {{}}
        for fam in ("AF_INET", "AF_INET6"):
            try:
                s = socket.socket(getattr(socket, fam), socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect(("127.0.0.1" if fam == "AF_INET" else "::1", {port}))
                res[fam] = "connected"
            except OSError as e:
                res[fam] = e.errno
        try:
            socket.getaddrinfo("pypi.org", 443)
            res["dns"] = "resolved"
        except OSError as e:
            res["dns"] = "failed"
        print(json.dumps(res))
    """)
    import errno
    assert out == {"AF_INET": errno.EACCES, "AF_INET6": errno.EACCES, "dns": "failed"}, out
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever arrived
    listener.close()


def test_writes_land_only_in_its_own_folder(host, tmp_path):
    canary = tmp_path / "outside.txt"
    out = run(policy_for(host), f"""
        import json, os
        res = {{}}
        for p in [{str(canary)!r}, {str(host['cache'] / 'planted')!r}, "/usr/planted", {str(Path(sys.prefix) / 'planted')!r},
                  {str(Path(sandbox.__file__).parent / 'planted.py')!r}, os.path.join(os.getcwd(), "inputs", "x")]:
            try:
                open(p, "w").write("x")
                res[p] = "written"
            except OSError as e:
                res[p] = type(e).__name__
        open(os.path.join(os.getcwd(), "mine.txt"), "w").write("ok")
        open("/tmp/scratch", "w").write("private tmpfs")
        print(json.dumps(res))
    """)
    assert "written" not in out.values(), out
    assert not canary.exists() and not (host["cache"] / "planted").exists()
    assert not (Path(sandbox.__file__).parent / "planted.py").exists() and not (Path(sys.prefix) / "planted").exists()
    assert (host["work"] / "mine.txt").read_text() == "ok"  # its own folder is writable
    assert not Path("/tmp/scratch").exists()                 # its /tmp is its own


def test_staged_inputs_are_read_only_even_to_their_owner(host):
    policy = policy_for(host)
    policy.inputs.mkdir(parents=True, exist_ok=True)
    blob = policy.inputs / "scene"
    blob.write_bytes(b"the scene")
    out = run(policy, f"""
        import json, os
        res = {{}}
        try:
            open({str(blob)!r}, "r+b").write(b"poisoned")
            res["write"] = "written"
        except OSError as e:
            res["write"] = e.strerror
        try:
            os.chmod({str(blob)!r}, 0o777)
            res["chmod"] = "done"
        except OSError as e:
            res["chmod"] = e.strerror
        res["read"] = open({str(blob)!r}, "rb").read().decode()
        print(json.dumps(res))
    """)
    assert out["read"] == "the scene" and out["write"] != "written" and out["chmod"] != "done", out
    assert blob.read_bytes() == b"the scene"


def test_fork_bomb_stops_at_the_process_limit(host):
    out = run(policy_for(host, processes=40), """
        import json, os, time
        kids, err = [], ""
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError as e:
                err = e.strerror
                break
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            kids.append(pid)
        for k in kids:
            os.kill(k, 9)
            os.waitpid(k, 0)
        print(json.dumps({"forked": len(kids), "error": err}))
    """)
    assert out["forked"] < 40 and "temporarily unavailable" in out["error"], out


def test_memory_stops_at_the_limit(host):
    out = run(policy_for(host, memory_bytes=256 * 1024**2), """
        import json
        blocks, err = [], ""
        try:
            for _ in range(64):
                blocks.append(bytearray(16 * 1024**2))  # 16 MiB each, 1 GiB in all
        except MemoryError:
            err = "MemoryError"
        print(json.dumps({"allocated_mib": 16 * len(blocks), "error": err}))
    """)
    assert out["error"] == "MemoryError" and out["allocated_mib"] < 256, out


def test_file_size_limit(host):
    out = run(policy_for(host, file_bytes=1024**2), """
        import json, os, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            with open("big.bin", "wb") as f:
                f.write(b"x" * (4 * 1024**2))
            err = ""
        except OSError as e:
            err = e.strerror
        print(json.dumps({"error": err, "size": os.path.getsize("big.bin")}))
    """)
    assert out["error"] == "File too large" and out["size"] <= 1024**2, out


def test_clean_environment_and_no_privilege(host):
    secrets = {"RENDERHIVE_TOKEN": "tok-123", "RENDERHIVE_ENROLL_TOKEN": "rhe_secret", "AWS_SECRET_ACCESS_KEY": "x",
               "RENDERHIVE_RENDER_THREADS": "1"}
    out = run(policy_for(host), """
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        def call(*args):
            r = libc.syscall(*args)
            return ctypes.get_errno() if r == -1 else 0
        status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
        print(json.dumps({
            "env": sorted(os.environ), "uid": os.getuid(), "euid": os.geteuid(),
            "nnp": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
            "caps": status["CapEff"].strip(),
            "ptrace": call(101, 16, 1, 0, 0),            # ptrace(PTRACE_ATTACH, pid 1)
            "unshare_user": call(272, 0x10000000),       # unshare(CLONE_NEWUSER)
            "mount": call(165, b"none", b"/tmp", b"tmpfs", 0, 0),
            "bpf": call(321, 0, 0, 0),
        }))
    """, env=secrets)
    import errno
    assert "RENDERHIVE_TOKEN" not in out["env"] and "RENDERHIVE_ENROLL_TOKEN" not in out["env"], out["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in out["env"] and "RENDERHIVE_RENDER_THREADS" in out["env"], out["env"]
    assert out["nnp"] == "1" and out["seccomp"] == "2" and int(out["caps"], 16) == 0, out
    assert out["ptrace"] == errno.EPERM and out["unshare_user"] == errno.EPERM, out
    assert out["mount"] == errno.EPERM and out["bpf"] == errno.EPERM, out
    if os.geteuid() == 0:  # a root worker's child runs as an unprivileged uid of its own
        assert out["uid"] == out["euid"] == sandbox.SANDBOX_UID_BASE, out


def test_probe_reports_what_it_found(monkeypatch):
    assert "bubblewrap" in sandbox.probe()
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)  # a host without bubblewrap
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap.*--no-sandbox"):
        sandbox.probe()
