"""The coordinator holds under hostile load (issue 18): every attack of tests/helpers/attacks.py at once,
against a real ``farm serve`` (payments on, the embedded chain), while an 8-frame job of the sample scene
renders on two real sandboxed ``farm worker`` daemons. Loopback only.

The attacks run in a child process (their own GIL) from before the job is submitted (the lease takers
must be READY when it is queued) until it is rendered and at least MIN_ATTACK_SECONDS have passed. Meanwhile
this process watches: the coordinator's VmRSS every 0.2 s, an authenticated ``GET /api/jobs/{id}`` on a
fresh connection every 0.5 s (from 127.0.0.2: the slow heads fill 127.0.1.x's per-address caps, and the
global cap is left room by design), the HTTP connections the coordinator holds by peer address, and an
honest raw worker that records the gaps between the coordinator's heartbeats. Then:

* the job is ``rendered`` within JOB_DEADLINE seconds of its submission and every frame is pixel-equal to
  the direct bpy render, rendered by w1 or w2 (no attacker's output was taken);
* no honest worker was ever dropped: each was welcomed once and never lost the coordinator (their logs),
  the coordinator never logged one gone, the probe got no DISCONNECT and never waited as long as the
  liveness time (3 heartbeat intervals, after which an honest worker reconnects) for a heartbeat;
* the coordinator's peak RSS stays under RSS_BOUND, and every API sample is answered 200 within API_BOUND;
* each attack was refused the way it should be (see ``_attack_violations``): 401 for every anonymous body
  and 413 for every oversized one, at most 64 (+16 for a loop turn) connections of one address held a
  second or more, DISCONNECT for a new key's HELLO with an honest worker's id, both image bombs refused;
  and each attack that needs a lease got one (else it did not happen).

Measured on the 2-core development machine (8 runs, shared with other work): the job 9.8-14.1 s from
submission (about 1 s without the attacks: it waits for the hoarder's and leeches' leases), peak RSS
195-218 MiB (idle 155), API p50 7-13 ms and p99 0.14-0.42 s, the longest heartbeat gap 1.1-1.9 s. On the
tree before the per-peer send queue (commit 21ce368, where a peer's queue held 10,000 messages) the two
leeches' 12,000 unread chunks took the coordinator to 1,653 MiB and the job to 38.7 s.

Every bound is checked and all that failed are reported together. Shorter timeouts than the defaults, so
that the defences act within the test: a lease with no progress is taken back after LEASE_STALL_MIN = 5 s
(default 60 s) and leases last 8 s (default 30 s), both through HOSTILE_ENV. The HTTP limits are the
defaults (10 s head deadline, 64 connections an address, 512 in all).

ATTACKS_PENDING names attacks left out of the mix because a defence they need is not in yet; the owner of
that defence empties it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from common import limits as L
from tests.conftest import pixels, submit_sample, wait_for, wait_workers
from tests.helpers.attacks import ATTACKS, ApiGauge, AttackProcess, ConnGauge, HeartbeatProbe, RssGauge, Target

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ATTACKS_PENDING: set[str] = set()
"""Attacks not run yet, each because a defence it needs is missing (see the module docstring).

``boasting_hoarders``: 12 fresh worker ids, one slot each, claiming 10^8 work units/s and the scene cached,
take all 8 tasks of the new job (the weighted choice trusts an unmeasured claim; the exploration floor
gives the two honest workers 0.1 / 14 of each draw). No frame of the job is ever measured, so their
leases, heart-beaten without progress, are kept for LEASE_STALL_SECONDS (3600 s) instead of
LEASE_STALL_MIN: measured, 0 of 8 frames after 60 s, no lease lost, w1 and w2 idle throughout."""

HOSTILE_ENV = {"RENDERHIVE_LEASE_STALL_MIN": "5", "RENDERHIVE_LEASE_SECONDS": "8"}
RSS_BOUND = int(1.5 * 1024**3)
"""The coordinator's resident memory, at most (it idles at about 155 MiB with the embedded chain)."""
API_BOUND = 1.0
"""Seconds an API sample may take, connection included (generous: the machine may have two slow cores)."""
HEARTBEAT_GAP_BOUND = L.HEARTBEAT_INTERVAL * L.HEARTBEAT_LIVENESS
"""Longest silence an honest worker may see: after this it gives up on the coordinator and reconnects."""
JOB_DEADLINE = 100.0
MIN_ATTACK_SECONDS = 30.0
HONEST = ("w1", "w2")


def _ended(view: dict) -> dict | None:
    return view if view["status"] in ("rendered", "failed", "canceled") else None


def _attack_violations(rep: dict, wants: set[str], conns: ConnGauge) -> list[str]:
    """What each attack should have met, as a list of what it did not."""
    bad = []

    def statuses(attack: str) -> dict[str, int]:
        return {k: v for k, v in rep.get(attack, {}).items() if "status" in k or k.startswith("error")}
    if "big_posts" in wants:
        got = statuses("big_posts")
        if not got or set(got) != {"status 401"}:
            bad.append(f"big_posts: anonymous 64 MiB POSTs were answered {got} (want 401 only)")
    if "oversized_json" in wants:
        got = statuses("oversized_json")
        if not got or any(not k.endswith("status 413") for k in got):
            bad.append(f"oversized_json: answered {got} (want 413 only)")
    if "slowloris" in wants:
        s = rep.get("slowloris", {})
        held = conns.most.get("127.0.1.1", 0)  # the coordinator's sockets open for a second or more
        if held > 64 + 16 or conns.most_total > 512 + 16:
            bad.append(f"slowloris: the coordinator held {held} connections from 127.0.1.1 for a second or more "
                       f"at once (cap 64), {conns.most_total} in all (cap 512): {dict(conns.most)}")
        if not s.get("closed by the server: 503"):
            bad.append(f"slowloris: no connection beyond the per-address cap was refused 503: {s}")
        if s.get("longest held (s)", 0) > 10 + 5:
            bad.append(f"slowloris: a half-sent head was held {s['longest held (s)']} s (head deadline 10 s)")
    if "throwaway_keys" in wants:  # refused: DISCONNECT, or a handshake refused (no reply) past the address's budget
        t = rep.get("throwaway_keys", {})
        impostors = {k: v for k, v in t.items() if k.startswith("impostor")}
        if not impostors or set(impostors) - {"impostor: DISCONNECT", "impostor: no reply in 10 s"}:
            bad.append(f"throwaway_keys: HELLOs from new keys with an honest worker's id got {impostors} "
                       "(want DISCONNECT, or no handshake)")
    if "blob_flood" in wants and not rep.get("blob_flood", {}).get("leeches that held a lease"):
        bad.append(f"blob_flood: no leech held a lease, so none was granted the scene: {rep.get('blob_flood')}")
    if "boasting_hoarders" in wants and not rep.get("boasting_hoarders", {}).get("distinct leases"):
        bad.append("boasting_hoarders: none held a lease, so the attack did not happen")
    if "hoarder" in wants and not rep.get("hoarder", {}).get("distinct leases"):
        bad.append("hoarder: it never held a lease, so the attack did not happen")
    for bomb in ("bomb_image", "bomb_image_16k"):
        if bomb in wants:
            b = rep.get(bomb, {})
            if "upload" not in b:
                bad.append(f"{bomb}: never sent (the hoarder had no lease to send it under): {b}")
            elif b.get("ACK accepted") is not False:
                bad.append(f"{bomb}: the RESULT of a PNG claiming {'30000' if bomb == 'bomb_image' else '16384'} "
                           f"pixels a side for a 64x48 frame was not refused: {b}")
    return bad


def test_the_coordinator_holds_under_hostile_load(farm, worker, reference_frames, tmp_path):
    wants = set(ATTACKS) - ATTACKS_PENDING
    f = farm(HOSTILE_ENV)
    ws = {wid: worker(f, wid, env=HOSTILE_ENV) for wid in HONEST}
    alice, mallory = f.creator("alice"), f.creator("mallory")
    wait_workers(alice, 2)
    sha, _ = alice.upload_if_missing(Path(__file__).resolve().parents[2] / "sample_scenes" / "turntable.blend")
    target = Target(http_port=f.hport, endpoint=f.endpoint, server_key_file=str(f.server_key_file),
                    token=mallory.token, scene_sha256=sha, work=str(tmp_path / "attacks"))

    rss, conns = RssGauge(f.p.pid), ConnGauge(f.p.pid, f.hport)
    rss.start()
    conns.start()
    probe = HeartbeatProbe(target)
    probe.start()
    assert probe.welcomed.wait(10), "the probe was not welcomed"
    time.sleep(1.0)
    idle_rss = rss.peak
    attackers = AttackProcess(target, wants).start()
    try:
        t_attack = time.monotonic()
        job = submit_sample(alice, "1-8")
        t_submit = time.monotonic()
        api = ApiGauge(f.hport, alice.token, f"/api/jobs/{job['id']}")
        api.start()
        done = wait_for(lambda: _ended(alice.job(job["id"])), JOB_DEADLINE, interval=0.25,
                        what=f"job {job['id']} rendered under attack")
        job_seconds = time.monotonic() - t_submit
        time.sleep(max(0.0, MIN_ATTACK_SECONDS - (time.monotonic() - t_attack)))
    finally:
        rep = attackers.stop()
    attack_seconds = time.monotonic() - t_attack
    time.sleep(1.0)
    for g in (api, probe, rss, conns):
        g.stop()

    violations = _attack_violations(rep, wants, conns)
    api_summary = api.summary()
    summary = {"attacks": sorted(wants), "pending": sorted(ATTACKS_PENDING), "job status": done["status"],
               "job seconds (submit to rendered)": round(job_seconds, 1), "attack seconds": round(attack_seconds, 1),
               "coordinator RSS idle / peak (MiB)": (idle_rss >> 20, rss.peak >> 20),
               "API": api_summary, "probe's longest heartbeat gaps (s into the attacks, s)":
                   [(round(a - t_attack, 1), round(g, 2)) for a, g in probe.gaps(t_attack)[:5]],
               "HTTP connections held 1 s or more, most at once": (conns.most_total, dict(conns.most)),
               "HTTP connections, most at once (refused ones too)": (conns.most_any_total, dict(conns.most_any)),
               "probe DISCONNECTs": probe.disconnects, "what the attackers saw": rep}
    print("\nhostile load:", json.dumps(summary, indent=1, default=str))

    # the honest job
    if done["status"] != "rendered":
        violations.append(f"the job ended {done['status']}: {done.get('error')}")
    # the coordinator's own bounds
    if rss.peak > RSS_BOUND:
        top = max(rss.samples, key=lambda s: s[1])
        violations.append(f"coordinator RSS peaked at {rss.peak >> 20} MiB, {top[0] - t_attack:.1f} s into the "
                          f"attacks (bound {RSS_BOUND >> 20} MiB, idle {idle_rss >> 20} MiB)")
    slow = [(round(t - t_attack, 1), x and round(x, 2), st) for t, x, st in api.samples
            if x is None or st != 200 or x > API_BOUND]
    if slow or api_summary["samples"] < 0.5 * job_seconds:
        violations.append(f"API: {len(slow)} of {api_summary['samples']} samples of GET /api/jobs/{job['id']} not "
                          f"answered 200 within {API_BOUND} s ((s into the attacks, seconds, status): {slow[:12]}); "
                          f"p50 {api_summary['p50']}, p99 {api_summary['p99']}")
    # no honest worker dropped
    gap = probe.max_gap(t_attack)
    if gap >= HEARTBEAT_GAP_BOUND or probe.disconnects:
        violations.append(f"the probe waited {gap:.2f} s for a heartbeat (an honest worker reconnects after "
                          f"{HEARTBEAT_GAP_BOUND:.0f} s) and was told {probe.disconnects}")
    serve_log = f.log.read_text(errors="replace")
    for wid, w in ws.items():
        log = w.log.read_text(errors="replace")
        welcomes = log.count(f"worker {wid}: connected to ")
        lost = [line for line in log.splitlines() if "lost the coordinator" in line or "asked to reconnect" in line]
        gone = [line for line in serve_log.splitlines() if f"worker {wid} gone" in line]
        if welcomes != 1 or lost or gone:
            violations.append(f"honest worker {wid}: welcomed {welcomes} times, {lost[:3]}, coordinator: {gone[:3]}")
    if f.alive:
        online = {w["id"]: w["online"] for w in alice.workers()}
        if not all(online.get(wid) for wid in HONEST):
            violations.append(f"honest workers not online after the attacks: {[w for w in HONEST if not online.get(w)]}")
    else:
        violations.append(f"the coordinator died:\n{f.tail(30)}")
    assert not violations, "the coordinator did not hold:\n- " + "\n- ".join(violations)

    # every frame the direct bpy render's, from an honest worker
    alice.approve(job["id"])
    outs = alice.outputs(job["id"])
    assert sorted(o["frame"] for o in outs) == list(range(1, 9)), "each frame exactly once"
    assert {o["worker_id"] for o in outs} <= set(HONEST), f"an attacker's output was taken: {outs}"
    for p in alice.download_results(job["id"], tmp_path / "out"):
        frame = int(p.stem.split("_")[1])
        got, want = pixels(p), pixels(reference_frames[frame])
        assert got.shape == (48, 64, 4) and np.array_equal(got, want), f"frame {frame} differs from the direct bpy render"
