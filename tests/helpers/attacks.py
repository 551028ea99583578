"""Hostile clients of a running coordinator, and the gauges that watch it while they attack (issue 18).

    python -m tests.helpers.attacks --target TARGET.json --report REPORT.json [--scale K] [--attacks a,b,...]

The attacks (:data:`ATTACKS`), each in its own threads of this process, all at once, until its stdin
closes or says ``stop``; it prints ``ready`` once the workers that must hold leases have said READY (so
that the honest job can be submitted after them), and writes what each attack saw to REPORT.json:

* ``big_posts``: anonymous (no token, or a wrong one) ``POST /api/jobs`` declaring 64 MiB, the body streamed
  until the answer comes (expected: 401 from the headers);
* ``oversized_json``: a known creator's ``POST /api/jobs`` declaring 64 MiB (413 from the header) and a
  chunked ``POST /api/blobs/missing`` that streams 5 MiB without declaring it (413 once 4 MiB are read);
* ``slowloris``: hundreds of half-sent request heads, a header line trickled every 2 s, reopened when
  the coordinator closes them; most from one address, about 60 from each of a few more (the per-address
  cap is 64, the global one 512);
* ``blob_flood``: workers (``leech-N``) that take one lease each, then send thousands of BLOB_GETs for its
  input (the job's scene, 117 KB: one chunk) and read nothing more, with the smallest receive queue ZeroMQ
  allows, so that whatever the coordinator queues for them stays in the coordinator (2 × 6,000 chunks
  queued would be 1.4 GB);
* ``hello_flood``: one key saying HELLO with hundreds of fake worker ids on one socket;
* ``throwaway_keys``: hundreds of sockets, each with a fresh CURVE key, one HELLO each (a few of them
  with an honest worker's id);
* ``hoarder``: a worker that takes leases (READY with several slots), heart-beats them, and never makes
  progress;
* ``boasting_hoarders``: hoarders under many fresh worker ids (free on an open farm), one slot each, whose
  HELLO claims 10^8 work units/s (an honest CPU worker here: ~150) and the job's scene in its cache: the scheduler
  weighs them by claimed speed and locality until measured, so together they take nearly every task of a
  new job; with no frame of the job ever measured, a lease without progress is kept LEASE_STALL_SECONDS
  (an hour) instead of LEASE_STALL_MIN;
* ``bomb_image``: the hoarder uploads (BLOB_PUT, under its lease) a 1 KB PNG whose IHDR claims 30000×30000
  and RESULTs it as its task's frame; ``bomb_image_16k``: a 780 KB PNG that really decodes to 16384×16384
  RGB (805 MB of zeros; 16384 is the worker's own resolution cap), where the task asked for 64×48.

The gauges (:class:`RssGauge`, :class:`ConnGauge`, :class:`ApiGauge`, :class:`HeartbeatProbe`) run in the
test's (or the benchmark's) own process, apart from the attackers' GIL; :class:`AttackProcess` starts and
stops the child. Addresses: the attackers use 127.0.1.x (slow
heads), 127.0.0.3 (anonymous bodies), 127.0.0.4 (authenticated ones), 127.0.2.1 (the workers that take
leases), 127.0.2.2 (the HELLO flood) and 127.0.2.3 (the throw-away keys); the API gauge asks from
127.0.0.2 and the heartbeat probe, as the honest workers, connects from 127.0.0.1: the per-address caps
the attackers fill are not the ones the honest clients are measured through.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.helpers.attack_kit import (  # noqa: F401  (shared by the attack modules)
    ATTACKS,
    BIG,
    HEAD,
    HELLO_FLOOD_SOURCE,
    HELLO_ROUND_GAP,
    LEASE_ATTACKS,
    SLOWLORIS_PER_SPREAD,
    THROWAWAY_SOURCE,
    WORKER_SOURCE,
    Intensity,
    Tally,
    Target,
)
from tests.helpers.attacks_http import big_posts, oversized_json, slowloris
from tests.helpers.attacks_plane import hello_flood, lease_attackers, throwaway_keys
from tests.helpers.gauges import ApiGauge, ConnGauge, HeartbeatProbe, RssGauge, percentile  # noqa: F401


# ------------------------------------------------------------------ running the mix
def start(t: Target, wants: set[str], k: Intensity, stop: threading.Event, tally: Tally) -> tuple[list, threading.Event]:
    """Start the attacks in ``wants`` in threads; returns the threads and the event set once the lease
    attackers are READY (set at once when there are none)."""
    threads, ready = [], threading.Event()

    def spawn(fn, *args):
        th = threading.Thread(target=fn, args=(t, stop, tally, *args), daemon=True, name=fn.__name__)
        th.start()
        threads.append(th)
    if wants & LEASE_ATTACKS:
        spawn(lease_attackers, wants | ({"hoarder"} if wants & {"bomb_image", "bomb_image_16k"} else set()), k, ready)
    else:
        ready.set()
    if "big_posts" in wants:
        for i in range(k.big_posts):
            spawn(big_posts, i)
    if "oversized_json" in wants:
        for i in range(k.oversized_json):
            spawn(oversized_json, i)
    if "slowloris" in wants:
        spread = {f"127.0.1.{2 + i}": SLOWLORIS_PER_SPREAD for i in range(k.slowloris_spread)}
        spawn(slowloris, {"127.0.1.1": k.slowloris, **spread})
    if "hello_flood" in wants:
        spawn(hello_flood, k)
    if "throwaway_keys" in wants:
        spawn(throwaway_keys, k)
    return threads, ready


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.attacks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="a JSON file of Target's fields")
    ap.add_argument("--report", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args(argv)
    t = Target(**json.loads(Path(args.target).read_text()))
    wants = {a for a in args.attacks.split(",") if a}
    unknown = wants - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}: choose among {', '.join(ATTACKS)}")
    k = Intensity().scaled(args.scale)
    stop, tally = threading.Event(), Tally()
    threads, ready = start(t, wants, k, stop, tally)
    if not ready.wait(60):
        print("the lease attackers got no WELCOME in 60 s", file=sys.stderr, flush=True)
    print("ready", flush=True)
    t0 = time.monotonic()
    for line in sys.stdin:  # until EOF or "stop"
        if line.strip() == "stop":
            break
    stop.set()
    for th in threads:
        th.join(30)
    rep = tally.report()
    rep["_run"] = {"seconds": round(time.monotonic() - t0, 1), "attacks": sorted(wants), "intensity": asdict(k),
                   "threads left running": [th.name for th in threads if th.is_alive()]}
    Path(args.report).write_text(json.dumps(rep, indent=1, sort_keys=True))
    return 0



@dataclass
class AttackProcess:
    """The attacks of :func:`main` in a child process (its own GIL); :meth:`stop` returns its report."""
    target: Target
    attacks: set[str]
    scale: float = 1.0
    proc: object = None
    report_file: Path = field(default=None)

    def start(self, timeout: float = 90.0) -> AttackProcess:
        import subprocess
        work = Path(self.target.work)
        work.mkdir(parents=True, exist_ok=True)
        (work / "target.json").write_text(json.dumps(asdict(self.target)))
        self.report_file = work / "attack-report.json"
        repo = Path(__file__).resolve().parents[2]
        with open(work / "attacks.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.attacks", "--target", str(work / "target.json"), "--report",
                 str(self.report_file), "--scale", str(self.scale), "--attacks", ",".join(sorted(self.attacks))],
                cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:  # "ready": the lease attackers said READY
            line = self.proc.stdout.readline()
            if line.strip() == b"ready":
                return self
        self.proc.kill()
        self.proc.wait(10)
        raise RuntimeError(f"the attack process did not get ready: {line!r}, see {work / 'attacks.log'}")

    def stop(self, timeout: float = 60.0) -> dict:
        import subprocess
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
            self.proc.wait(timeout)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        return json.loads(self.report_file.read_text()) if self.report_file.exists() else {}


if __name__ == "__main__":
    sys.exit(main())
