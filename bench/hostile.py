"""The coordinator under hostile load, at rising intensity: the attack mix of tests/helpers/attacks.py
(anonymous 64 MiB POSTs, oversized JSON, slow heads, a BLOB_GET flood that reads nothing, HELLO floods
from one key and from throw-away keys, a lease hoarder, image bombs) against a real ``farm serve`` while
an honest job renders on two real sandboxed workers, side by side with the same job and no attack.

    python bench/hostile.py [--quick] [--levels 0,1,4] [--frames 1-24] [--repeat R] [--attacks a,b,...]
                            [--min-attack S] [--keep]

Each level is a fresh coordinator (same worker caches, so the workers' benchmark is measured once) and
scale × the attack counts of :class:`tests.helpers.attacks.Intensity` (level 0: no attack). Per level:

* **RSS**: the coordinator's peak VmRSS (sampled every 0.2 s);
* **heartbeat gap**: the longest silence between two coordinator HEARTBEATs seen by an honest raw worker
  that takes no work (honest workers reconnect after 3 s);
* **API p50 / p99**: an authenticated ``GET /api/jobs/{id}`` on a fresh connection every 0.5 s, from an
  address no attacker uses; failures (no 200 within 10 s) counted apart;
* **job**: the honest job's seconds from submission to ``rendered`` (polled every 0.25 s);
* the ratio of each to level 0 of the same round. Rounds alternate the order of the levels; with
  ``--repeat`` > 1 the medians are printed.

After every run the job's frames are downloaded and compared pixel for pixel with level 0's of the same
round (every frame by an honest worker), and the honest workers' logs are checked for reconnects.
The coordinator runs with the test's shorter lease times (a lease without progress is taken back after
5 s instead of 60 s; leases last 8 s), so that the hoarder costs the job seconds, not minutes.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import localfarm
from tests.e2e.test_hostile_load import ATTACKS_PENDING
from tests.helpers.attacks import (
    ATTACKS,
    ApiGauge,
    AttackProcess,
    ConnGauge,
    HeartbeatProbe,
    RssGauge,
    Target,
)

SCENE = ROOT / "sample_scenes" / "turntable.blend"
SETTINGS = {"resolution_percent": 20, "samples": 4}  # 64x48, as the tests
ENV = {"RENDERHIVE_LOG": "INFO", "RENDERHIVE_LEASE_STALL_MIN": "5", "RENDERHIVE_LEASE_SECONDS": "8",
       "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(ROOT / ".no-hub-cache-in-tests")}
HONEST = ("w1", "w2")


def run_level(root: Path, name: str, scale: float, attacks: set[str], frames: str, min_attack: float,
              deadline: float) -> dict:
    env = localfarm.process_env(ENV)
    f = localfarm.Coordinator(root / name, env).start()
    procs: list[localfarm.Proc] = [f]
    try:
        ws = {wid: localfarm.WorkerProc(root / wid, f, wid, env, 1, gpus="none").start() for wid in HONEST}
        procs += ws.values()
        welcomed = {wid: _welcomes(w) for wid, w in ws.items()}
        alice, mallory = f.creator("alice"), f.creator("mallory")
        localfarm.wait_workers(alice, 2, 120)
        sha, _ = alice.upload_if_missing(SCENE)
        target = Target(http_port=f.hport, endpoint=f.endpoint, server_key_file=str(f.server_key_file),
                        token=mallory.token, scene_sha256=sha, work=str(root / name / "attacks"))
        rss, conns = RssGauge(f.p.pid), ConnGauge(f.p.pid, f.hport)
        probe = HeartbeatProbe(target)
        for g in (rss, conns, probe):
            g.start()
        probe.welcomed.wait(10)
        attackers = AttackProcess(target, attacks, scale).start() if scale > 0 else None
        t0 = time.monotonic()
        job = alice.submit(scene_sha256=sha, frames=frames, **SETTINGS)
        api = ApiGauge(f.hport, alice.token, f"/api/jobs/{job['id']}")
        api.start()
        view = localfarm.wait_for(lambda: _ended(alice.job(job["id"])), deadline, 0.25, f"job {job['id']} rendered")
        job_s = time.monotonic() - t0
        time.sleep(max(0.0, min_attack - (time.monotonic() - t0)))  # the quiet run is watched as long
        report = attackers.stop() if attackers is not None else {}
        until = time.monotonic()
        for g in (api, rss, conns, probe):
            g.stop()
        if view["status"] != "rendered":
            raise SystemExit(f"{name}: the job ended {view['status']}: {view.get('error')}")
        alice.approve(job["id"])
        outs = alice.outputs(job["id"])
        paths = alice.download_results(job["id"], root / name / "out")
        frames_by = {int(p.stem.split("_")[1]): p for p in paths}
        reconnects = {wid: _welcomes(w) - welcomed[wid] - 1 for wid, w in ws.items()}
        lat = sorted(api.latencies())
        return {"rss": rss.peak, "gap": probe.max_gap(t0, until), "disconnects": len(probe.disconnects),
                "p50": _pct(lat, 50), "p99": _pct(lat, 99), "api_failed": api.summary()["not answered count"],
                "api_n": len(api.samples), "job": job_s, "frames": frames_by,
                "by": {o["worker_id"] for o in outs}, "reconnects": reconnects,
                "held_most": conns.most_total, "held_by": dict(conns.most), "fds_most": conns.most_any_total, "report": report}
    finally:
        for p in reversed(procs):
            p.stop()


def _ended(view: dict) -> dict | None:
    return view if view["status"] in ("rendered", "failed", "canceled") else None


def _welcomes(w: localfarm.WorkerProc) -> int:
    try:
        return w.log.read_text(errors="replace").count(f"worker {w.worker_id}: connected to ")
    except FileNotFoundError:
        return 0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if len(values) > 1 else values[0]


def _same_frames(a: dict[int, Path], b: dict[int, Path]) -> bool:
    if sorted(a) != sorted(b):
        return False
    for k, path in a.items():
        with Image.open(path) as x, Image.open(b[k]) as y:
            if not np.array_equal(np.asarray(x), np.asarray(y)):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="frames 1-8, one round, 15 s of attacks at least")
    ap.add_argument("--levels", default="0,1,4", help="attack scales; 0 (no attack) is the baseline, run first")
    ap.add_argument("--frames", default=None, help="the honest job's frames (default 1-24; --quick 1-8)")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 3; --quick 1)")
    ap.add_argument("--attacks", default=",".join(a for a in ATTACKS if a not in ATTACKS_PENDING),
                    help=f"a subset of {','.join(ATTACKS)} (default: all but the test's ATTACKS_PENDING, "
                         f"{','.join(sorted(ATTACKS_PENDING)) or 'none'})")
    ap.add_argument("--min-attack", type=float, default=None, help="seconds the attacks last at least (30; --quick 15)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, reports, frames)")
    args = ap.parse_args(argv)
    frames = args.frames or ("1-8" if args.quick else "1-24")
    rounds = args.repeat or (1 if args.quick else 3)
    min_attack = args.min_attack if args.min_attack is not None else (15.0 if args.quick else 30.0)
    levels = [float(x) for x in args.levels.split(",")]
    if levels[0] != 0:
        levels = [0.0, *[x for x in levels if x != 0]]
    attacks = {a for a in args.attacks.split(",") if a}
    root = Path(tempfile.mkdtemp(prefix="rh-hostile-"))
    print(f"frames {frames} at 64x48, levels {levels}, {rounds} round(s), attacks {','.join(sorted(attacks))}; in {root}")
    results: dict[float, list[dict]] = {lv: [] for lv in levels}
    t_all = time.monotonic()
    problems = []
    try:
        for r in range(rounds):
            order = [levels[0], *(levels[1:] if r % 2 == 0 else levels[:0:-1])]  # the baseline first each round
            base = None
            for lv in order:
                name = f"r{r}-x{lv:g}"
                res = run_level(root, name, lv, attacks, frames, min_attack, 240.0)
                results[lv].append(res)
                base = base or res
                ok = _same_frames(res["frames"], base["frames"]) and res["by"] <= set(HONEST)
                if not ok:
                    problems.append(f"{name}: frames differ from the quiet run's, or came from {res['by']}")
                if any(res["reconnects"].values()):
                    problems.append(f"{name}: honest workers reconnected {res['reconnects']}")
                print(f"  {name}: job {res['job']:.1f} s, RSS {res['rss'] >> 20} MiB, gap {res['gap']:.2f} s, "
                      f"API p50/p99 {_ms(res['p50'])}/{_ms(res['p99'])} ms ({res['api_failed']} of {res['api_n']} "
                      f"failed), frames {'ok' if ok else 'DIFFER'}, reconnects {res['reconnects']}, HTTP connections held "
                      f"at most {res['held_most']} {res['held_by']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    _table(levels, results)
    print(f"\n{time.monotonic() - t_all:.0f} s in all")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _table(levels: list[float], results: dict[float, list[dict]]) -> None:
    def med(lv, key):
        vals = [r[key] for r in results[lv] if r[key] is not None]
        return statistics.median(vals) if vals else None
    rows = [("coordinator peak RSS (MiB)", "rss", lambda v: f"{v / 2**20:.0f}"),
            ("max heartbeat gap, honest probe (s)", "gap", lambda v: f"{v:.2f}"),
            ("API p50 (ms)", "p50", lambda v: f"{v * 1000:.0f}"),
            ("API p99 (ms)", "p99", lambda v: f"{v * 1000:.0f}"),
            ("API samples failed", "api_failed", lambda v: f"{v:.0f}"),
            ("HTTP connections held >= 1 s, most", "held_most", lambda v: f"{v:.0f}"),
            ("HTTP sockets at once (refused too)", "fds_most", lambda v: f"{v:.0f}"),
            ("honest job wall time (s)", "job", lambda v: f"{v:.1f}")]
    heads = ["quiet" if lv == 0 else f"x{lv:g}" for lv in levels]
    print(f"\n{'':42}" + "".join(f"{h:>16}" for h in heads))
    for label, key, fmt in rows:
        base = med(levels[0], key)
        cells = []
        for lv in levels:
            v = med(lv, key)
            cell = "-" if v is None else fmt(v)
            if lv != levels[0] and v is not None and base and key not in ("api_failed", "held_most", "fds_most"):
                cell += f" ({v / base:.2f}x)"
            cells.append(cell)
        print(f"{label:42}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
