"""Separate network stacks on one machine for the multi-host test: Linux network namespaces (``ip netns``).

:func:`make_lab` builds, for the roles asked (e.g. ``coord``, ``w1``, ``w2``), one namespace each with its
own loopback and one veth leg, all legs joined by a bridge that lives in a namespace of its own, on a
private /24 that nothing in the root namespace uses (10.77.0.0/24 unless taken). The root namespace gets
one leg too (``.254``), so that the test process can reach the hosts, as a creator's machine would.
Role number i gets ``.i+1``. Processes are put in a namespace with ``ip netns exec NAME`` in front of
their command line (:meth:`Lab.launcher`; ``client.localfarm.Proc.launcher``).

Names carry the test process's pid (``rhmh<pid>-<role>``), so concurrent runs do not collide; the
namespaces of runs whose process is gone are removed on the next :func:`make_lab`. :meth:`Lab.teardown`
deletes the namespaces (which destroys the veths and the bridge in them) and the root namespace's leg; it
never raises, so it can run in a finalizer after any failure. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN):
where that is missing, :class:`NetnsUnavailable` says so.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

PREFIX = "rhmh"
SUBNETS = [ipaddress.ip_network(f"10.77.{n}.0/24") for n in range(256)]
ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "unreachable", "blackhole", "prohibit",
               "throw", "nat"}


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here; the message says why and what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def namespaces() -> list[str]:
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose test process is gone (a run killed before its teardown)."""
    for name in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"\d+: ({PREFIX}(\d+)r[ab])[@:]", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            _ip("link", "del", m.group(1), check=False)


def free_subnet() -> ipaddress.IPv4Network:
    """The first 10.77.N.0/24 that no address or route of the root namespace overlaps."""
    used = []
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            used.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        words = line.split()
        if words and words[0] in ROUTE_TYPES:
            words = words[1:]
        if words and words[0] != "default":
            try:
                used.append(ipaddress.ip_network(words[0], strict=False))
            except ValueError:
                pass
    for net in SUBNETS:
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsUnavailable("every 10.77.N.0/24 is in use in this network namespace: free one for the test")


@dataclass
class Lab:
    tag: str                                                # rhmh<pid>
    subnet: ipaddress.IPv4Network
    hosts: dict[str, str] = field(default_factory=dict)     # role → namespace name
    addrs: dict[str, str] = field(default_factory=dict)     # role → its address
    root_addr: str = ""
    bridge_ns: str = ""

    def launcher(self, role: str) -> list[str]:
        """The command prefix that runs a program in ``role``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[role]]

    def run(self, role: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([*self.launcher(role), *argv], capture_output=True, text=True, timeout=timeout)

    def reachable(self, role: str, targets: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """Try a TCP connection from ``role``'s namespace to each (host, port): 'open', 'refused', or the
        error's name."""
        code = ("import json, socket, sys\nout = []\nfor host, port in json.loads(sys.argv[1]):\n"
                "    try:\n        socket.create_connection((host, port), timeout=3).close(); out.append('open')\n"
                "    except OSError as exc:\n"
                "        out.append('refused' if isinstance(exc, ConnectionRefusedError) else type(exc).__name__)\n"
                "print(json.dumps(out))")
        res = self.run(role, [sys.executable, "-c", code, json.dumps(targets)])
        if res.returncode != 0:
            raise RuntimeError(f"probe in {role} failed: {res.stderr[-500:]}")
        return dict(zip(targets, json.loads(res.stdout)))

    def teardown(self) -> list[str]:
        """Delete everything this lab made; returns what could not be deleted (never raises)."""
        left = []
        for ns in [*self.hosts.values(), self.bridge_ns]:
            if ns and ns in namespaces() and _ip("netns", "del", ns, check=False).returncode != 0:
                left.append(f"netns {ns}")
        for leg in (f"{self.tag}ra", f"{self.tag}rb"):  # gone with its peer's namespace, normally
            if _ip("link", "show", leg, check=False).returncode == 0 and \
                    _ip("link", "del", leg, check=False).returncode != 0:
                left.append(f"link {leg}")
        return left


def make_lab(roles: list[str]) -> Lab:
    """Namespaces for ``roles`` on a bridged private /24, plus a leg in the root namespace. Raises
    :class:`NetnsUnavailable` (after cleaning up) when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run the tests as "
                               "root, or in a container started with --cap-add NET_ADMIN --cap-add SYS_ADMIN")
    try:
        subprocess.run(["ip", "-V"], capture_output=True, timeout=10)
    except FileNotFoundError:
        raise NetnsUnavailable("the `ip` command (iproute2) is missing: apt-get install iproute2") from None
    remove_stale()
    tag = f"{PREFIX}{os.getpid()}"
    lab = Lab(tag, free_subnet())
    hosts = list(lab.subnet.hosts())
    try:
        lab.bridge_ns = f"{tag}-br"
        _ip("netns", "add", lab.bridge_ns)
        _ip("-n", lab.bridge_ns, "link", "set", "lo", "up")
        _ip("-n", lab.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", lab.bridge_ns, "link", "set", "br0", "up")
        legs = [(role, f"{tag}-{role}", f"{tag}{i}a", f"{tag}{i}b", str(hosts[i])) for i, role in enumerate(roles)]
        for role, ns, inner, outer, addr in legs:
            _ip("netns", "add", ns)
            lab.hosts[role], lab.addrs[role] = ns, addr
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", lab.bridge_ns)
            _ip("-n", lab.bridge_ns, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/{lab.subnet.prefixlen}", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
        lab.root_addr = str(hosts[-1])  # .254
        _ip("link", "add", f"{tag}ra", "type", "veth", "peer", "name", f"{tag}rb")
        _ip("link", "set", f"{tag}rb", "netns", lab.bridge_ns)
        _ip("-n", lab.bridge_ns, "link", "set", f"{tag}rb", "master", "br0", "up")
        _ip("addr", "add", f"{lab.root_addr}/{lab.subnet.prefixlen}", "dev", f"{tag}ra")
        _ip("link", "set", f"{tag}ra", "up")
    except BaseException:
        lab.teardown()
        raise
    return lab
