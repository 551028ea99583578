"""Reputation, weighted assignment and verified results, driven through ``Coordinator.step`` with real
PNG files in a real blob store (a deterministic "scene": frame f always renders to the same pixels, as
Cycles on one device does), honest and cheating workers answering TASKs as the worker daemon would."""
from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common import protocol as P
from common import rasters
from farm import constants as C
from farm.core.coordinator import Coordinator
from farm.core.scheduler import EXPLORE, Conn, Scheduler
from farm.store.models import Attempt, Check, Job, Output, ReputationEvent, Task, Worker
from farm.verify import reputation as R
from tests.fixtures_inproc import Driver, get, make_engine_and_store, make_job, make_user, of, put_scene, rows

W, H = 40, 30


def scene(frame: int, sha: str = "") -> np.ndarray:
    """The honest render of ``frame`` of scene ``sha``: the same pixels every time."""
    a = np.random.default_rng([frame, int(sha[:12] or "0", 16)]).integers(0, 256, (H, W, 4), dtype=np.uint8)
    a[..., 3] = 255
    return a


def store_png(blobs, pixels: np.ndarray) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = rasters.write(Path(d) / "x.png", rasters.Raster("png", {"": pixels}, []))
        return blobs.write_bytes(Path(path).read_bytes())


CHEATS = {  # mode → (frame, scene, task id) → pixels
    "black": lambda f, sc, t: np.zeros((H, W, 4), np.uint8) + np.array([0, 0, 0, 255], np.uint8),
    "noise": lambda f, sc, t: np.random.default_rng(10_000 + t).integers(0, 256, (H, W, 4), dtype=np.uint8),
    "copy": lambda f, sc, t: scene(1, sc),                  # another frame of the job
    "stale": lambda f, sc, t: scene(f, "5ca1e5ce0e"),       # the frame of another job's scene
    "painted": lambda f, sc, t: _painted(scene(f, sc), t),  # right frame, a small region painted over
}


def _painted(a: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y = int(rng.integers(0, W - 7)), int(rng.integers(0, H - 5))
    a = a.copy()
    a[y:y + 5, x:x + 7, :3] = (255, 0, 255)
    return a


class Farm:
    """In-process workers around a Driver: ``behaviour[ident]`` is None (honest) or a cheating mode."""

    def __init__(self, d: Driver, blobs, behaviour: dict[bytes, str | None], caps: dict | None = None):
        self.d, self.blobs, self.behaviour = d, blobs, behaviour
        self.did: Counter = Counter()       # (ident, kind) → tasks done
        self.pending: list = []
        for ident in behaviour:
            self.connect(ident, caps)

    def connect(self, ident: bytes, caps: dict | None = None) -> None:
        self.d.hello(ident, 1, **(caps or {}))
        self.pending += self.d.send((ident, P.Ready(1)))

    def answer(self, ident: bytes, t: P.Task) -> P.Result:
        mode = self.behaviour[ident]
        frame, sc = t.spec["frames"][0], t.spec["scene_sha256"]
        assert not {"check_id", "exclude", "only_worker"} & set(t.spec), "a worker is never told it is a check"
        is_check = get(self.d.coord.engine, Task, t.task_id).check_id is not None  # the test may look
        self.did[ident, "check" if is_check else t.kind] += 1
        if t.kind == "verify":
            full = scene(frame, sc) if mode is None else CHEATS[mode](frame, sc, t.task_id)
            boxes = t.spec["regions"] or [[0, W, 0, H]]
            outs = []
            for name, (x0, x1, y0, y1) in zip(t.spec["outputs"], boxes):
                secs = 0.2 * (x1 - x0) * (y1 - y0) / (W * H)  # a frame takes 0.2 s, a region its share
                outs.append({"frame": frame, "name": name, "sha256": store_png(self.blobs, full[y0:y1, x0:x1]),
                             "seconds": secs})
            return P.Result(t.task_id, t.attempt, outs, sum(o["seconds"] for o in outs))
        outs = []
        for f in t.spec["frames"]:
            px = scene(f, sc) if mode is None else CHEATS[mode](f, sc, t.task_id)
            outs.append({"frame": f, "name": f"frame_{f:04d}.png", "sha256": store_png(self.blobs, px),
                         "seconds": 0.2})
        return P.Result(t.task_id, t.attempt, outs, 0.2)

    def run(self, rounds: int = 2000) -> None:
        self.d.coord.want_assign = True  # new jobs (the API tells the broker the same way)
        for _ in range(rounds):
            tasks = [(i, m) for i, m in self.pending if isinstance(m, P.Task) and i in self.behaviour]
            if not tasks:
                self.pending = self.d.tick(dt=C.SWEEP_INTERVAL)  # heartbeats keep everyone alive
                self.pending += self.d.send(*[(i, P.Heartbeat([])) for i in self.behaviour])
                if not any(isinstance(m, P.Task) for _, m in self.pending):
                    return
                continue
            results = [(i, self.answer(i, t)) for i, t in tasks]
            self.pending = self.d.send(*results, dt=0.3)
            self.pending += self.d.send(*[(i, P.Ready(1)) for i, _ in tasks])
        raise AssertionError("the farm did not settle")


@pytest.fixture
def env(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    user, _ = make_user(engine, "alice")
    coord = Coordinator(engine, blobs, Scheduler(seed=7), verify=True)
    yield engine, blobs, user, coord, Driver(coord)
    assert coord.stats["stale_cache"] == 0, "a batch had to be handled again from the database"


def final_outputs_correct(engine, blobs, job_id: int) -> bool:
    outs = rows(engine, Output, Output.job_id == job_id)
    sc = get(engine, Job, job_id).spec["scene_sha256"]
    return bool(outs) and all(np.array_equal(rasters.read(blobs.path(o.sha256)).planes[""], scene(o.frame, sc))
                              for o in outs)


_scenes = iter(range(1, 10**6))


def new_job(engine, blobs, user, frames: str, **kw) -> int:
    """A job of a scene of its own (two jobs never render the same bytes, as in life: PNG metadata differs)."""
    return make_job(engine, blobs, user, frames, scene=put_scene(blobs, str(next(_scenes)).encode()), **kw)


# ------------------------------------------------------------------ checks of honest workers
def test_new_workers_are_checked_in_full_then_trusted_and_sampled(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {b"w1": None, b"w2": None})
    job = new_job(engine, blobs, user, "1-12")
    farm.run()
    assert get(engine, Job, job).status == "rendered" and final_outputs_correct(engine, blobs, job)
    checks = rows(engine, Check, order=Check.id)
    assert checks and all(c.status == "passed" for c in checks)
    assert {c.mode for c in checks[:6]} == {"full"}, "a new worker's results are re-rendered whole"
    for wid in ("w1", "w2"):
        w = get(engine, Worker, wid)
        assert w.tier == "trusted" and w.checks_failed == 0 and w.checks_passed >= 3
        assert w.reputation == pytest.approx(R.score(w.rep_good, w.rep_bad))
        assert len(rows(engine, ReputationEvent, ReputationEvent.worker_id == wid)) == w.checks_passed
    # the checks are not the job's tasks: not counted, not in its task list, not paid as the job's frames
    from farm.kinds import jobs
    from farm.payments import pricing
    from farm.store.db import session as new_session
    with new_session(engine) as s:
        view = jobs.job_view(s, s.get(Job, job), detail=True)
        assert view["tasks"]["total"] == 12 and sum(v for k, v in view["tasks"].items() if k != "total") == 12
        assert len(view["task_list"]) == 12 and len(view["checks"]) == len(checks)
        paid_tasks = sum(n for _, n in pricing.accepted_work(s, job).values())
        assert paid_tasks == 12
        # ... but their verifiers are paid, by the job, at its reference work × the share re-rendered
        ref = pricing.reference_work(s, job)
        p = pricing.Pricing(price_per_unit=10**16)
        shares, capped = pricing.shares(s, p, job, 10**30)
        assert not capped and sum(x.checks for x in shares) == len(checks)
        for x in shares:
            mine = [c for c in checks if c.verifier_id == x.worker_id]
            want = sum(round(ref * pricing.check_fraction(c.mode) * 1000) for c in mine)
            assert x.checks == len(mine) and abs(x.check_ms - want) <= len(mine), (x, want)
            assert x.amount == p.cost(x.work_ms + x.check_ms) and x.check_ms > 0
        assert pricing.check_fraction("crops") == pytest.approx(C.CHECK_CROPS * C.CHECK_CROP_FRACTION)


def test_a_lone_worker_is_accepted_unverified(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {b"w1": None})
    job = new_job(engine, blobs, user, "1-2")
    farm.run()
    assert get(engine, Job, job).status == "rendered" and rows(engine, Check) == []
    assert get(engine, Worker, "w1").checks_passed == 0, "unverified work earns no reputation"


# ------------------------------------------------------------------ cheaters
@pytest.mark.parametrize("mode", sorted(CHEATS))
def test_a_cheater_is_caught_voided_and_starved(env, mode):
    engine, blobs, user, coord, d = env
    honest = {b"h1": None, b"h2": None, b"h3": None}
    farm = Farm(d, blobs, {**honest, b"cheat": mode})
    jobs_ = [new_job(engine, blobs, user, "1-6") for _ in range(6)]
    farm.run()
    cheated = [a for a in rows(engine, Attempt, Attempt.worker_id == "cheat")   # its wrong results
               if a.outcome in ("done", "voided") and (task := get(engine, Task, a.task_id)).check_id is None
               and not np.array_equal(CHEATS[mode](task.spec["frames"][0], task.spec["scene_sha256"], task.id),
                                      scene(task.spec["frames"][0], task.spec["scene_sha256"]))]
    touched = {a.job_id for a in cheated}
    caught = {c.job_id for c in rows(engine, Check, Check.suspect_id == "cheat", Check.status == "failed")}
    for j in jobs_:
        assert get(engine, Job, j).status == "rendered", j
        assert final_outputs_correct(engine, blobs, j), f"job {j} has a wrong frame"
    assert all(a.outcome == "voided" for a in cheated), "no wrong result stands"
    assert touched and touched <= caught, "caught in every job it touched"
    cheat = get(engine, Worker, "cheat")
    assert cheat.tier == "probation" and cheat.checks_failed >= 1
    for h in ("h1", "h2", "h3"):
        assert get(engine, Worker, h).checks_failed == 0, f"honest {h} was flagged"
    renders = sum(n for (i, k), n in farm.did.items() if k == "render")
    assert farm.did[b"cheat", "render"] / renders < 0.1
    # it got work only until the first verdict on it; none after (its share of later work is 0)
    first_verdict = min(c.decided_at for c in rows(engine, Check, Check.suspect_id == "cheat", Check.status == "failed"))
    leases = rows(engine, Attempt, Attempt.worker_id == "cheat")
    assert leases and all(a.started_at <= first_verdict for a in leases
                          if get(engine, Task, a.task_id).check_id is None)


def test_a_caught_worker_gets_only_probes_and_stays_out_while_it_fails_them(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {b"h1": None, b"h2": None, b"cheat": "painted"})
    new_job(engine, blobs, user, "1-6")
    farm.run()
    assert get(engine, Worker, "cheat").tier == "probation"
    before = farm.did[b"cheat", "render"]
    for _ in range(3):  # later jobs; probes come after the backoff
        new_job(engine, blobs, user, "1-4")
        d.now += C.PROBE_BACKOFF * 8
        farm.pending += d.send(*[(i, P.Ready(1)) for i in farm.behaviour])
        farm.run()
    assert farm.did[b"cheat", "render"] == before, "no job work on probation"
    probes = rows(engine, Check, Check.mode == "probe")
    assert probes and all(p.suspect_id == "cheat" and p.status == "failed" for p in probes)
    assert get(engine, Worker, "cheat").tier == "probation"


def test_an_honest_worker_on_probation_passes_probes_and_returns(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {b"h1": None, b"h2": None})
    new_job(engine, blobs, user, "1-4")
    farm.run()
    from farm.store.db import session as new_session
    with new_session(engine) as s:  # a worker that had a bad week: on probation, honest now
        w = s.get(Worker, "h2")
        R.record(s, w, "check_failed", d.now)
        s.commit()
    farm.connect(b"h2")
    assert coord.conns[coord.by_worker["h2"]].tier == "probation"
    for _ in range(8):
        d.now += C.PROBE_BACKOFF + 1
        farm.pending += d.send((b"h2", P.Ready(1)))
        farm.run()
        if get(engine, Worker, "h2").tier != "probation":
            break
    passed = rows(engine, Check, Check.mode == "probe", Check.status == "passed")
    assert passed and all(p.suspect_id == "h2" for p in passed) and get(engine, Worker, "h2").tier == "new"


def test_a_verifier_that_lies_loses_the_tiebreak(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {b"h1": None})
    job = new_job(engine, blobs, user, "1")
    # h1 renders frame 1 while it is alone... then a lying verifier and an honest third arrive
    farm.behaviour[b"liar"] = "noise"
    farm.connect(b"liar")
    farm.behaviour[b"h3"] = None
    farm.connect(b"h3")
    farm.run()
    new_job(engine, blobs, user, "2-7")
    farm.run()
    assert all(final_outputs_correct(engine, blobs, j) for j in (job, job + 1))
    assert get(engine, Worker, "h1").checks_failed == 0 and get(engine, Worker, "h3").checks_failed == 0
    assert get(engine, Worker, "liar").checks_failed >= 1
    # a verifier is paid for a check only when its re-render decided the verdict: the liar's disputed
    # checks pay it nothing; the tiebreaks' verifiers are paid
    from farm.payments import pricing
    from farm.store.db import session as new_session
    with new_session(engine) as s:
        disputed = 0
        for j in (job, job + 1):
            lied = [c for c in rows(engine, Check, Check.job_id == j) if c.verifier_id == "liar"]
            paid = pricing.check_work(s, j)
            disputed += sum(c.status == "disputed" for c in lied)
            if any(c.status == "disputed" for c in lied):
                assert paid.get("liar", (0, 0))[1] == sum(c.status in pricing.CHECK_VERDICTS for c in lied)
                assert any(c.mode == "tiebreak" and c.verifier_id in paid
                           for c in rows(engine, Check, Check.job_id == j))
        assert disputed, "the liar disagreed at least once (the case under test)"


def test_unreadable_output_is_refused_and_counts_against_the_worker(env):
    engine, blobs, user, coord, d = env
    new_job(engine, blobs, user, "1")
    d.hello(b"w1", 1)
    [t] = of(d.send((b"w1", P.Ready(1))), P.Task)
    sha = blobs.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    out = d.send((b"w1", P.Result(t.task_id, 1, [{"frame": 1, "name": "frame_0001.png", "sha256": sha}], 0.1)))
    [ack] = of(out, P.Ack)
    assert not ack.accepted and "cannot be read" in ack.reason
    assert get(engine, Task, t.task_id).status == "queued" and rows(engine, Output) == []
    assert [e.kind for e in rows(engine, ReputationEvent)] == ["invalid_result"]


def test_a_byte_copy_of_another_output_is_checked_even_for_a_trusted_worker(env, monkeypatch):
    engine, blobs, user, coord, d = env
    monkeypatch.setitem(C.CHECK_RATE, "trusted", 0.0)
    farm = Farm(d, blobs, {b"w1": None, b"w2": None})
    first = new_job(engine, blobs, user, "1-10")
    first_scene = get(engine, Job, first).spec["scene_sha256"]
    farm.run()
    assert get(engine, Worker, "w1").tier == "trusted" and get(engine, Worker, "w2").tier == "trusted"
    n = len(rows(engine, Check))
    job = make_job(engine, blobs, user, "1-2", scene=first_scene)  # the same frames again: the same bytes
    farm.run()
    new = rows(engine, Check, Check.job_id == job)
    assert len(rows(engine, Check)) > n and all("byte for byte" in c.reason for c in new)
    assert all(c.status == "passed" for c in new) and get(engine, Job, job).status == "rendered"


# ------------------------------------------------------------------ weighted assignment
def _conn(name: str, rep: float, speed: float | None, held: set[str] = frozenset()) -> Conn:
    c = Conn(name.encode(), name, 1, {"runtimes": ["blender"]}, 0.0, free=1, held_blobs=set(held))
    c.reputation, c.speed = rep, speed
    return c


def test_an_unmeasured_boast_weighs_at_most_twice_the_measured_median_and_stalls_sooner():
    """The attack (found by tests/e2e/test_hostile_load.py): twelve fresh ids claiming 10⁸ work units a
    second took every task of a new job and sat on them, for no frame of it was measured yet. An unmeasured
    claim now weighs at most UNMEASURED_SPEED_CAP × the measured median, and its own claim sets how long its
    first lease may go without progress (LEASE_STALL_SECONDS ÷ the claim's ratio, at least LEASE_STALL_MIN)."""
    from farm.core import scheduler as S
    from farm.core.leases import ProgressWatch
    honest = [_conn("h1", 0.8, 150.0), _conn("h2", 0.8, 160.0)]
    for c in honest:
        c.measured = True
    boaster = _conn("boast", 0.8, 1e8)
    p = Scheduler.weights([], [*honest, boaster])
    # capped at twice the measured median (0.5 of the draw; the exploration floor lifts the others a little);
    # uncapped it would be all of it
    assert 0.4 < p[2] <= 2 * 155 / (150 + 160 + 2 * 155) + 1e-9, p
    assert S.claim_ratio(boaster, 155.0) == pytest.approx(1e8 / 155) and S.claim_ratio(honest[0], 155.0) == 1.0
    # a fresh farm (nothing measured yet): the yardstick is the lowest claim, which a flock cannot raise
    fresh = [_conn("h1", 0.5, 142.0), _conn("h2", 0.5, 150.0), *[_conn(f"b{i}", 0.5, 1e8) for i in range(12)]]
    assert S.yardstick(fresh) == 142.0 and S.claim_ratio(fresh[5], 142.0) == pytest.approx(1e8 / 142)
    q = Scheduler.weights([], fresh)
    assert q[2] / q[0] <= 2 * 142 / 142 + 1e-9, "each boaster weighs at most twice the lowest claim"

    class T:  # a lease as the watch sees it (id, attempt, job, spec, when it started)
        id, attempt, job_id, spec, started_at = 1, 1, 9, {}, 1000.0
    watch = ProgressWatch()
    assert not watch.stalled(T, 1000 + C.LEASE_STALL_MIN - 1, claim=1e6)
    assert watch.stalled(T, 1000 + C.LEASE_STALL_MIN + 1, claim=1e6), "a boaster's first frame may not stall long"
    fresh = ProgressWatch()
    assert not fresh.stalled(T, 1000 + C.LEASE_STALL_MIN + 1, claim=1.0), "an honest claim keeps the long limit"
    assert not fresh.stalled(T, 1000 + C.LEASE_STALL_SECONDS - 1) and fresh.stalled(T, 1000 + C.LEASE_STALL_SECONDS + 1)


def test_weighted_choice_matches_reputation_times_speed_with_an_exploration_floor():
    cands = [_conn("top", 0.95, 200.0), _conn("fast", 0.8, 400.0), _conn("new", 0.5, None),
             _conn("weak", 0.31, 50.0, {"scene"})]
    for c in cands:  # speeds the coordinator measured (an unmeasured claim is capped: the test above)
        c.measured = c.speed is not None
    sched = Scheduler(seed=1234)
    p = Scheduler.weights(["scene"], cands)
    ref = 200.0  # median of the known speeds 50, 200, 400
    raw = [0.95 * 1.0, 0.8 * 2.0, 0.5 * 1.0, 0.31 * 0.25 * 4.0]
    want = [(1 - EXPLORE) * r / sum(raw) + EXPLORE / 4 for r in raw]
    assert p == pytest.approx(want) and sum(p) == pytest.approx(1.0) and ref
    n = 40_000
    counts = Counter(sched.choose(["scene"], cands).worker_id for _ in range(n))
    chi2 = sum((counts[c.worker_id] - n * q) ** 2 / (n * q) for c, q in zip(cands, p))
    assert chi2 < 16.27, f"chi2 {chi2:.2f} over 3 degrees of freedom (p=0.001 critical value 16.27)"
    # the floor: a worker with almost no reputation or speed still gets EXPLORE / n of the work
    starved = [_conn("a", 0.99, 1000.0), _conn("b", 0.001, 1.0)]
    for c in starved:
        c.measured = True
    share = Counter(sched.choose([], starved).worker_id for _ in range(20_000))["b"] / 20_000
    assert share == pytest.approx(EXPLORE / 2, abs=0.01)


def test_weighted_choice_is_the_standard_libraries_weighted_draw():
    """choose() inlines random.choices: with the same seed it picks what random.choices picks, draw for draw
    (several inputs, some held, mixed speeds and reputations)."""
    cands = [_conn(f"w{i}", (i % 7) / 7, None if i % 3 else 10.0 + i, {"scene", "tex"} if i % 2 else {"tex"})
             for i in range(40)]
    ours, ref = Scheduler(seed=7), random.Random(7)
    for inputs in (["scene"], ["scene", "tex", "hdri"], []):
        picks = [ours.choose(inputs, cands).worker_id for _ in range(500)]
        want = [ref.choices(cands, weights=Scheduler.weights(inputs, cands))[0].worker_id for _ in range(500)]
        assert picks == want and len(set(picks)) > 10


def test_a_job_requiring_trusted_never_lands_on_a_new_worker(env):
    engine, blobs, user, coord, d = env
    from farm.store.db import session as new_session
    with new_session(engine) as s:
        for wid, tier in (("old", "trusted"), ("fresh", "new")):
            w = Worker(id=wid)
            s.add(w)
            if tier == "trusted":
                for _ in range(5):
                    R.record(s, w, "check_passed", d.now)
        s.commit()
    farm = Farm(d, blobs, {b"old": None, b"fresh": None})
    job = new_job(engine, blobs, user, "1-8", min_tier="trusted")
    farm.run()
    tasks = rows(engine, Task, Task.job_id == job, Task.kind == "render")
    assert get(engine, Job, job).status == "rendered" and len(tasks) == 8
    assert {o.worker_id for o in rows(engine, Output, Output.job_id == job)} == {"old"}
    assert farm.did[b"fresh", "render"] == 0 and farm.did[b"fresh", "check"] > 0, "new workers may check"


# ------------------------------------------------------------------ speed and durability
def test_an_overclaimed_benchmark_is_caught_by_its_render_seconds(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {})
    farm.behaviour[b"honest"] = None
    farm.connect(b"honest", {"benchmark": {"blender": 100.0}})
    farm.behaviour[b"boaster"] = None
    farm.connect(b"boaster", {"benchmark": {"blender": 1000.0}})  # claims 10x; renders as fast as honest
    for _ in range(6):  # every finished job measures both against the other (once that one is trusted)
        new_job(engine, blobs, user, "1-6")
        farm.run()
    b = get(engine, Worker, "boaster")
    assert b.speed_samples >= 3 and b.speed_measured == pytest.approx(100.0, rel=0.01)
    assert "overclaimed" in [e.kind for e in rows(engine, ReputationEvent, ReputationEvent.worker_id == "boaster")]
    assert R.speed(b) == pytest.approx(100.0, rel=0.01), "the measured speed replaces the claim"
    h = get(engine, Worker, "honest")
    assert "overclaimed" not in [e.kind for e in rows(engine, ReputationEvent, ReputationEvent.worker_id == "honest")]
    assert h.work_units > 0 and all(t.work_units > 0 for t in rows(engine, Task, Task.check_id.is_(None)))


def test_reputation_and_benchmark_survive_a_coordinator_restart(env):
    engine, blobs, user, coord, d = env
    farm = Farm(d, blobs, {})
    for ident in (b"w1", b"w2"):
        farm.behaviour[ident] = None
        farm.connect(ident, {"benchmark": {"blender": 123.5}})
    new_job(engine, blobs, user, "1-8")
    farm.run()
    before = {w.id: (w.reputation, w.tier, w.checks_passed, w.benchmark) for w in rows(engine, Worker)}
    assert before["w1"][1] == "trusted" and before["w1"][3] == {"blender": 123.5}
    coord2 = Coordinator(engine, blobs, Scheduler(seed=1), verify=True)  # a restart: nothing in memory
    d2 = Driver(coord2, now=d.now + 5)
    d2.hello(b"w1", 1)  # reconnects without a benchmark this time (e.g. --no-benchmark)
    conn = coord2.conns[b"w1"]
    assert (conn.reputation, conn.tier) == before["w1"][:2]
    w = get(engine, Worker, "w1")
    assert (w.reputation, w.tier, w.checks_passed) == before["w1"][:3]
    assert math.isclose(R.view(w)["reputation"], before["w1"][0], abs_tol=1e-4)


def test_reputation_math():
    assert R.score(0, 0) == 0.5 and R.tier_of(0.5, 0) == "new"
    assert R.tier_of(R.score(0, 10), 0) == "probation"
    assert R.tier_of(R.score(3, 0), 3) == "trusted" and R.tier_of(R.score(20, 0), 20) == "top"
    assert R.tier_of(R.score(20, 10), 20) == "new", "one failed check drops a top worker out of top"
    assert R.tier_of(R.score(4, 10), 4) == "new" and R.tier_of(R.score(3, 10), 3) == "probation"


def test_a_check_nobody_left_can_run_is_dropped_and_the_result_stands_unverified(env):
    engine, blobs, user, coord, d = env
    job = new_job(engine, blobs, user, "1")
    d.hello(b"w1", 1)
    d.hello(b"w2", 1)
    out = d.send((b"w1", P.Ready(1)))
    [t] = of(out, P.Task, b"w1")
    sc = t.spec["scene_sha256"]
    res = P.Result(t.task_id, 1, [{"frame": 1, "name": "frame_0001.png", "sha256": store_png(blobs, scene(1, sc)),
                                   "seconds": 0.2}], 0.2)
    d.send((b"w1", res), (b"w2", P.Bye("leaving")), dt=0.3)  # checked; the only other worker leaves
    assert get(engine, Task, t.task_id).status == "verifying"
    d.send((b"w1", P.Heartbeat([])), dt=C.CHECK_WAIT / 2)
    assert get(engine, Task, t.task_id).status == "verifying", "waits a while for a verifier"
    d.send((b"w1", P.Heartbeat([])), dt=C.CHECK_WAIT / 2 + 1)
    assert get(engine, Task, t.task_id).status == "accepted" and get(engine, Job, job).status == "rendered"
    [check] = rows(engine, Check)
    assert check.status == "unverified" and "no other worker" in check.metric["why"]
    assert get(engine, Worker, "w1").checks_passed == 0


def test_across_device_types_small_rounding_passes_and_a_painted_region_does_not():
    from farm.verify import compare
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:96, 0:128]
    base = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.float64) + rng.normal(0, 6, (96, 128, 3))
    def png(a):
        px = np.concatenate([np.clip(a, 0, 255).astype(np.uint8), np.full((96, 128, 1), 255, np.uint8)], -1)
        return rasters.Raster("png", {"": px}, [])
    ref = png(base)
    rounding = png(base + rng.choice([-1, 0, 0, 1], base.shape))  # another device: off by one step here and there
    painted = base.copy()
    painted[40:62, 50:78] = (255, 0, 255)                        # 5 % of the frame painted over
    assert compare.compare(ref, None, rounding, exact=True)["passed"] is False, "like devices: equal or nothing"
    assert compare.compare(ref, None, rounding, exact=False)["passed"] is True
    r = compare.compare(ref, None, png(painted), exact=False)
    assert r["passed"] is False and r["ssim_min"] < C.CHECK_SSIM_WINDOW_MIN, r
    small = base.copy()
    small[40:46, 50:56] = (255, 0, 255)                          # 0.3 %: the mean barely moves
    r = compare.compare(ref, None, png(small), exact=False)
    assert r["passed"] is False and r["ssim"] > C.CHECK_SSIM_MIN and "window" in r["why"], r
    assert compare.compare(ref, (10, 40, 10, 30), ref.crop(10, 40, 10, 30), exact=True)["equal"]
