"""HELLO: what a connecting worker must say before it gets a connection, and the Worker row it updates.

Checked here, before anything is stored: the scheduler reads a connection's slots, runtimes and cached
blobs for every assignment round, so one bad value would stop it for everyone. A worker's own claims
(benchmark speeds) are taken only within bounds; the scheduler weighs an unmeasured claim at most twice
the farm's yardstick (farm/core/scheduler.py). Caps on ids per CURVE key and handshakes per address are
the gate's (farm/plane/gate.py), before a HELLO reaches the coordinator.
"""
from __future__ import annotations

from sqlmodel import Session

from common import protocol as P
from farm.store.models import Worker

MAX_WORKER_ID = 100
MAX_SLOTS = 64
BENCHMARKS = ("blender", "diffusion")


def refusal(msg: P.Hello, require_sandbox: bool) -> P.Error | P.Disconnect | None:
    """The answer to a HELLO that must not be admitted, or None."""
    try:
        P.running_pairs(msg.running)
    except P.ProtocolError as exc:
        return P.Error(str(exc))
    if not msg.worker_id or len(msg.worker_id) > MAX_WORKER_ID or not 1 <= msg.slots <= MAX_SLOTS:
        return P.Error(f"HELLO needs a worker_id of 1-{MAX_WORKER_ID} characters and 1-{MAX_SLOTS} slots")
    lists = [msg.capabilities.get("runtimes", []), msg.capabilities.get("cached", []) or []]
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists):
        return P.Error("HELLO capabilities 'runtimes' and 'cached' must be lists of strings")
    if require_sandbox and str(msg.capabilities.get("sandbox") or "none") == "none":
        return P.Disconnect("this farm admits sandboxed workers only: install bubblewrap and start "
                            "`farm worker` without --no-sandbox")
    return None


def worker_row(s: Session, msg: P.Hello, now: float) -> Worker:
    """The Worker row of an admitted HELLO (new or updated), added to ``s``."""
    w = s.get(Worker, msg.worker_id) or Worker(id=msg.worker_id, first_seen=now)
    w.wallet, w.slots, w.online, w.last_seen = msg.wallet[:100], msg.slots, True, now
    w.capabilities = msg.capabilities
    w.hostname = str(msg.capabilities.get("hostname", ""))[:200]
    bench = msg.capabilities.get("benchmark")
    w.benchmark = {k: float(v) for k, v in (bench.items() if isinstance(bench, dict) else ())
                   if k in BENCHMARKS and type(v) in (int, float) and 0 < v < 1e12}
    s.add(w)
    return w
