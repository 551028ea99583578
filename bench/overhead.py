"""Farm overhead on real renders: the farm end to end against bpy alone, measured side by side.

    python bench/overhead.py [--quick] [--repeat R] [--frames N] [--percent P] [--keep]

Frames 1-24 of sample_scenes/turntable.blend at 320x240 (resolution 100 %), 16 Cycles samples, 8-bit
PNG (``--quick``: frames 1-6 at 160x120, i.e. 50 %):

a. **direct**: one bpy process opens the scene once, sets ``use_persistent_data``, then ``frame_set`` +
   ``render(write_still=True)`` per frame — the physical limit. Timed inside the process from before
   ``open_mainfile`` to the last write (``import bpy`` excluded, and reported).
b. **farm**: ``farm serve`` and one ``farm worker --gpus none`` as subprocesses (temporary data and cache
   dirs, free ports), a job submitted through :class:`client.api.Client` with the admin token. Timed from
   the upload-if-missing + submit to the moment the coordinator marked the job ``rendered`` (the job's
   ``updated_at``, so the polling interval, 0.5 s to keep its load off the render, does not count). Process start-up (coordinator, worker and its
   Blender runtime, until the worker shows online) is excluded, and reported.
c. **process per frame**: one new Python process per frame: ``import bpy``, open, render that frame.

``--phases``: the worker daemon records when each task reached each phase (``RENDERHIVE_PHASES``,
:func:`worker.pipeline.mark`), its Blender runtime adds wall-clock marks per frame (request, setup done,
frame start, render call, render end), and the coordinator's event log (its SQLite file) says when each
lease was granted and each result stored; printed per farm run: the median of each phase over the tasks,
and the farm's time outside render calls split into head (submit → first render call), the gaps between
one render call's end and the next one's start (the per-frame overhead on the critical path) and tail
(last render end → job rendered).

bpy runs only in child processes; this process never imports it. The farm's frames are downloaded and
compared pixel by pixel (numpy + Pillow) with (a)'s, and so are (c)'s.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.api import ApiError, Client  # noqa: E402
from client.localfarm import free_ports  # noqa: E402

SCENE = ROOT / "sample_scenes" / "turntable.blend"
PY = sys.executable

# Run as `python -c RENDER_SCRIPT SCENE OUT_DIR FRAMES SAMPLES PERCENT`; one JSON line on stdout.
# Same overrides as the worker's runtime applies for a PNG job (format, samples, percentage, threads).
RENDER_SCRIPT = r"""
import json, os, sys, time
t_start = time.perf_counter()
proto = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)   # Blender's chatter must not mix with our JSON line
import bpy
t_imported = time.perf_counter()
scene, out_dir, frames, samples, percent = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
bpy.context.preferences.filepaths.use_scripts_auto_execute = False
bpy.ops.wm.open_mainfile(filepath=scene, load_ui=False, use_scripts=False)
sc = bpy.context.scene
r, im = sc.render, sc.render.image_settings
im.media_type = "IMAGE"; im.file_format = "PNG"; im.color_mode = "RGBA"; im.color_depth = "8"
sc.cycles.samples = samples
r.resolution_percentage = percent
r.use_persistent_data = True
r.threads_mode = "AUTO"
per_frame = []
for f in (int(x) for x in frames.split(",")):
    t = time.perf_counter()
    sc.frame_set(f)
    r.filepath = os.path.join(out_dir, f"frame_{f:04d}.png")
    bpy.ops.render.render(animation=False, write_still=True)
    per_frame.append(time.perf_counter() - t)
t_end = time.perf_counter()
proto.write(json.dumps({"import_s": t_imported - t_start, "work_s": t_end - t_imported,
                        "per_frame": per_frame}) + "\n")
proto.flush()
"""


def bpy_env(tmp: Path) -> dict[str, str]:
    user, cache = tmp / "blender_user", tmp / "xdg_cache"
    user.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "BLENDER_USER_RESOURCES": str(user), "XDG_CACHE_HOME": str(cache)}


def render_direct(frames: list[int], out_dir: Path, samples: int, percent: int, env, log: Path) -> dict:
    """One bpy process rendering ``frames``; returns its timings plus the process's wall time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.run([PY, "-c", RENDER_SCRIPT, str(SCENE), str(out_dir), ",".join(map(str, frames)),
                               str(samples), str(percent)], stdout=subprocess.PIPE, stderr=err, env=env,
                              cwd=out_dir, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"direct render failed (exit {proc.returncode}); see {log}")
    return {**json.loads(proc.stdout.decode().strip().splitlines()[-1]), "wall_s": wall}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class Farm:
    """``farm serve`` + one ``farm worker`` as subprocesses, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, tmp: Path, phases: bool = False):
        self.tmp = tmp
        self.data, self.cache = tmp / "farm-data", tmp / "worker-cache"
        self.http, self.zmq = free_ports(2)
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "RENDERHIVE_LOG": "WARNING", "PYTHONPATH": str(ROOT)}
        self.phases = tmp / "phases.jsonl" if phases else None
        if self.phases:
            self.env["RENDERHIVE_PHASES"] = str(self.phases)
        self.client: Client | None = None

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen([PY, "-m", "client.cli", *args], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(p)
        return p

    def _wait(self, what: str, check, timeout: float = 180.0, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"a farm process exited ({p.args[3]}, code {p.returncode}) while waiting "
                                     f"for {what}; logs in {self.tmp}")
            try:
                value = check()
                if value:
                    return value
            except (ApiError, OSError):
                pass
            time.sleep(interval)
        raise SystemExit(f"timed out waiting for {what}; logs in {self.tmp}")

    def start(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self._spawn("serve", "serve", "--data", str(self.data), "--bind", f"tcp://127.0.0.1:{self.zmq}",
                    "--http", f"127.0.0.1:{self.http}")
        token_file = self.data / "admin.token"
        self._wait("the admin token", lambda: token_file.is_file() and token_file.read_text().strip())
        self.client = Client(f"http://127.0.0.1:{self.http}", token_file.read_text().strip())
        self._wait("the API", lambda: self.client.health()["ok"])
        t_serve = time.perf_counter() - t0
        self._spawn("worker", "worker", "--coordinator", f"tcp://127.0.0.1:{self.zmq}", "--cache",
                    str(self.cache), "--gpus", "none", "--worker-id", "bench-worker",
                    "--server-key", str(self.data / "curve" / "server.key"))  # CurveZMQ, as in production
        self._wait("the worker to come online", lambda: any(w["online"] for w in self.client.workers()))
        return {"serve_s": t_serve, "total_s": time.perf_counter() - t0}

    def render(self, frames: list[int], samples: int, percent: int, key: str) -> tuple[float, int, float, list[float]]:
        """Submit a job of ``frames``. Returns seconds from submit (upload included) to ``rendered``, the
        job id, the seconds the worker's runtime spent inside its render calls (from the outputs), and the
        CPU seconds the coordinator and the worker daemon (not its Blender child) used meanwhile."""
        c = self.client
        cpu0 = [cpu_seconds(p.pid) for p in self.procs]
        t_submit = time.time()
        sha, _ = c.upload_if_missing(SCENE)
        job = c.submit(scene_sha256=sha, scene_name=SCENE.name, frames=",".join(map(str, frames)), chunk=1,
                       format="PNG", samples=samples, resolution_percent=percent, name="bench", client_key=key)
        view = self._wait(f"job {job['id']}", lambda: (v := c.job(job["id"]))["status"] in
                          ("rendered", "failed", "canceled") and v, timeout=1200, interval=0.5)
        if view["status"] != "rendered":
            raise SystemExit(f"job {job['id']} {view['status']}: {view['error']}; logs in {self.tmp}")
        cpu = [cpu_seconds(p.pid) - c0 for p, c0 in zip(self.procs, cpu0)]  # coordinator, worker daemon
        render_s = sum(o["render_seconds"] for o in c.outputs(job["id"]))
        self.last = (t_submit, view["updated_at"])
        return view["updated_at"] - t_submit, job["id"], render_s, cpu  # updated_at: when marked rendered

    def stop(self) -> None:
        for p in reversed(self.procs):  # worker first: it says BYE
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def phases(farm: Farm, job_id: int, t_submit: float, t_rendered: float) -> dict[str, float]:
    """Per-phase medians (seconds) of job ``job_id``'s tasks, from the worker's phase log, its runtime's
    frame marks and the coordinator's event log; and the critical path split into head, gaps and tail."""
    db = sqlite3.connect(f"file:{farm.data / 'farm.db'}?mode=ro", uri=True)
    events = db.execute("SELECT task_id, attempt, new, at FROM event WHERE job_id = ? AND kind = 'task'",
                        (job_id,)).fetchall()
    job_events = db.execute("SELECT new, at FROM event WHERE job_id = ? AND kind = 'job' ORDER BY id",
                            (job_id,)).fetchall()
    db.close()
    job_at: dict[str, float] = {}
    for new, at in job_events:
        job_at.setdefault(new, at)
    coord: dict[tuple, dict[str, float]] = {}
    for task, attempt, new, at in events:
        coord.setdefault((task, attempt), {}).setdefault(new, at)
    work: dict[tuple, dict] = {}
    for line in farm.phases.read_text().splitlines():
        m = json.loads(line)
        work.setdefault((m["task"], m["attempt"]), {})[m["phase"]] = m
    spans: dict[str, list[float]] = {}

    def span(name: str, a, b) -> None:
        if a is not None and b is not None:
            spans.setdefault(name, []).append(b - a)
    calls = []  # (render call start, render end) of every frame
    tasks = []  # (first render call, phases at the worker, its frames' marks) of every task
    for key, c in coord.items():
        w = work.get(key)
        if not w or "rendered" not in w:
            continue
        at = {k: v["at"] for k, v in w.items()}
        frames = w["rendered"].get("frames") or []
        span("coordinator lease -> worker has TASK", c.get("assigned"), at.get("leased"))
        span("TASK -> inputs fetched", at.get("leased"), at.get("fetched"))
        span("fetched -> slot's turn (waits while the previous task renders)", at.get("fetched"), at.get("turn"))
        for i, f in enumerate(frames):
            t_req, t_ready, t_frame, t_call, t_end = f["marks"]
            if i == 0:
                span("turn -> request in the runtime (stage, PROGRESS, pipe)", at.get("turn"), t_req)
                span("runtime: scene load / settings", t_req, t_ready)
                span("setup done -> frame start", t_ready, t_frame)
            span("runtime: frame_set + frame checks", t_frame, t_call)
            span("runtime: render call (render + PNG write)", t_call, t_end)
            span("render end -> daemon has the frame event", t_end, f["at"])
            calls.append((t_call, t_end))
        if frames:
            tasks.append((frames[0]["marks"][3], at, frames, c))
            span("last frame event -> render done (request's end, turn passes)", frames[-1]["at"], at.get("rendered"))
        span("rendered -> outputs hashed and uploaded (off the path with prefetch)", at.get("rendered"), at.get("uploaded"))
        span("uploaded -> RESULT sent", at.get("uploaded"), at.get("reported"))
        span("RESULT sent -> stored by the coordinator (task done)", at.get("reported"), c.get("done"))
        span("stored -> ACK at the worker", c.get("done"), at.get("acked"))
    calls.sort()
    gaps = [b[0] - a[1] for a, b in zip(calls, calls[1:])]
    tasks.sort(key=lambda t: t[0])
    for (_, a, fa, _), (_, b, fb, _) in zip(tasks, tasks[1:]):  # one frame a task: the gap, part by part
        span("~gap: render end -> frame event at the daemon", fa[-1]["marks"][4], fa[-1]["at"])
        span("~gap: frame event -> render done (done event, watch stopped)", fa[-1]["at"], a.get("rendered"))
        span("~gap: render done -> next task's turn (outputs taken, recycle check)", a.get("rendered"), b.get("turn"))
        span("~gap: turn -> request read by the runtime", b.get("turn"), fb[0]["marks"][0])
        span("~gap: request -> render call (settings, frame_set, checks)", fb[0]["marks"][0], fb[0]["marks"][3])
    out = {name: statistics.median(v) for name, v in spans.items()}
    if tasks:
        first_at, first_c = tasks[0][1], tasks[0][3]
        out["@head: submit -> job queued (payments: deposit)"] = job_at.get("queued", t_submit) - t_submit
        out["@head: job queued -> first lease"] = (first_c.get("assigned") or 0) - job_at.get("queued", t_submit)
        out["@head: first lease -> inputs fetched"] = first_at.get("fetched", 0) - (first_c.get("assigned") or 0)
        out["@head: fetched -> first request in the runtime"] = tasks[0][2][0]["marks"][0] - first_at.get("fetched", 0)
        out["@head: first request -> render call (scene load)"] = tasks[0][0] - tasks[0][2][0]["marks"][0]
    if calls:
        out["@head: submit -> first render call"] = calls[0][0] - t_submit
        out["@gaps: sum of render end -> next render call"] = sum(gaps)
        out["@gap median (per frame on the critical path)"] = statistics.median(gaps) if gaps else 0.0
        # with the probe render on (farm serve's default), one task renders before the deposit: the gap
        # after it holds the quote and the deposit, not a frame's overhead
        out["@largest gap (after a probe render: quote + deposit)"] = max(gaps) if gaps else 0.0
        out["@tail: last render end -> job rendered"] = t_rendered - calls[-1][1]
    return out


def print_phases(runs: list[dict[str, float]], frames: int) -> None:
    names = list(dict.fromkeys(k for r in runs for k in r))
    print(f"phases of b (ms; per-task medians, then the critical path), median over {len(runs)} run(s):")
    for name in names:
        vals = [r[name] for r in runs if name in r]
        label = name.lstrip("@~")
        print(f"  {label:<70} {statistics.median(vals) * 1000:9.1f}")


def compare(ref_dir: Path, other_dir: Path, frames: list[int]) -> tuple[int, str]:
    """Frames whose pixels equal the reference's, and a note on the first difference."""
    same, note = 0, ""
    for f in frames:
        name = f"frame_{f:04d}.png"
        a = np.asarray(Image.open(ref_dir / name))
        try:
            b = np.asarray(Image.open(other_dir / name))
        except FileNotFoundError:
            note = note or f"{name} missing"
            continue
        if a.shape == b.shape and np.array_equal(a, b):
            same += 1
        elif not note:
            note = (f"{name}: shape {a.shape} vs {b.shape}" if a.shape != b.shape else
                    f"{name}: {int((a != b).any(axis=-1).sum())} pixels differ, max "
                    f"{int(np.abs(a.astype(int) - b.astype(int)).max())}/255")
    return same, note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 frames at 160x120")
    ap.add_argument("--repeat", type=int, default=None, help="runs of (a) and (b), alternating; medians "
                    "(default 3, quick 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, frames)")
    ap.add_argument("--phases", action="store_true", help="print where the farm's time goes, phase by phase")
    ap.add_argument("--skip-c", action="store_true", help="leave out (c), one Blender process per frame")
    ap.add_argument("--probe", choices=("auto", "off"), default="auto", help="the farm's probe render before "
                    "the deposit (RENDERHIVE_PROBE; auto, farm serve's default, counts it in b)")
    ap.add_argument("--frames", type=int, default=None, help="frames 1..N (default 24, quick 6)")
    ap.add_argument("--percent", type=int, default=None, help="resolution %% of 320x240 (default 100, quick 50)")
    args = ap.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    frames = list(range(1, (args.frames or (6 if args.quick else 24)) + 1))
    percent, samples = (args.percent or (50 if args.quick else 100)), 16
    size = f"{320 * percent // 100}x{240 * percent // 100}"
    tmp = Path(tempfile.mkdtemp(prefix="rh-overhead-"))
    env = bpy_env(tmp / "bpy")
    log = tmp / "bpy.log"
    print(f"overhead benchmark: {SCENE.name}, frames {frames[0]}-{frames[-1]} ({len(frames)}), {size}, "
          f"{samples} samples, PNG 8-bit, Cycles on the CPU ({os.cpu_count()} cores); bpy only in child "
          f"processes", flush=True)

    a_runs, b_runs, p_runs = [], [], []
    farm = Farm(tmp, args.phases)
    farm.env["RENDERHIVE_PROBE"] = args.probe
    try:
        startup = farm.start()
        print(f"farm start-up (excluded from b): coordinator + API {startup['serve_s']:.1f} s, "
              f"until the worker (Blender runtime loaded) is online {startup['total_s']:.1f} s", flush=True)
        for i in range(args.repeat):
            a = render_direct(frames, tmp / f"a{i}", samples, percent, env, log)
            a_runs.append(a)
            print(f"  a: direct       {a['work_s']:6.2f} s (open + {len(frames)} renders; import bpy "
                  f"{a['import_s']:.2f} s; process {a['wall_s']:.2f} s)", flush=True)
            b, job_id, b_render, b_cpu = farm.render(frames, samples, percent, key=f"bench-{i}")
            farm.client.approve(job_id)  # full-resolution frames are released on approval
            farm.client.download_results(job_id, tmp / f"b{i}")
            b_runs.append({"s": b, "render_s": b_render, "cpu": sum(b_cpu), "cpu_coord": b_cpu[0],
                           "cpu_daemon": b_cpu[-1]})
            if args.phases:
                p_runs.append(phases(farm, job_id, *farm.last))
            print(f"  b: farm         {b:6.2f} s (job {job_id}, submit → rendered; {b_render:.2f} s inside "
                  f"render calls; coordinator + worker daemon used {b_cpu[0]:.2f} + {b_cpu[-1]:.2f} s CPU)", flush=True)
    finally:
        farm.stop()

    c_dir = tmp / "c"
    t = time.perf_counter()
    c_runs = [render_direct([f], c_dir, samples, percent, env, log) for f in (frames[:1] if args.skip_c else frames)]
    c = (time.perf_counter() - t) * (len(frames) if args.skip_c else 1)  # --skip-c: one frame's, times N
    c_import = [r["import_s"] for r in c_runs]
    c_render = sum(sum(r["per_frame"]) for r in c_runs) * (len(frames) if args.skip_c else 1)
    print(f"  c: per frame    {c:6.2f} s ({len(frames)} processes; import bpy {statistics.median(c_import):.2f} s "
          "median each)", flush=True)

    med = statistics.median
    a_s = med(r["work_s"] for r in a_runs)
    a_r = med(sum(r["per_frame"]) for r in a_runs)
    b_s = med(r["s"] for r in b_runs)
    b_r = med(r["render_s"] for r in b_runs)
    a_out = med(r["work_s"] - sum(r["per_frame"]) for r in a_runs)
    b_out = med(r["s"] - r["render_s"] for r in b_runs)
    rep = f"median of {args.repeat}, a and b alternating" if args.repeat > 1 else "one run each"
    print()
    print(f"[{rep}; 'in render': frame_set + render(write_still) per frame (b: as the worker's runtime "
          "reports it); 'outside': the rest]")
    print(f"{'mode':<44} {'seconds':>8} {'s/frame':>8} {'in render':>10} {'outside':>8}")
    print("-" * 82)
    print(f"{'a  direct bpy, one process, persistent data':<44} {a_s:>8.2f} {a_s / len(frames):>8.3f} "
          f"{a_r:>10.2f} {a_out:>8.2f}")
    print(f"{'b  farm end to end, one worker':<44} {b_s:>8.2f} {b_s / len(frames):>8.3f} {b_r:>10.2f} "
          f"{b_out:>8.2f}")
    print(f"{'c  one new Blender process per frame':<44} {c:>8.2f} {c / len(frames):>8.3f} {c_render:>10.2f} "
          f"{c - c_render:>8.2f}" + ("   (--skip-c: frame 1 only, times N)" if args.skip_c else ""))
    print(f"b/a = {b_s / a_s:.3f} (goal <= 1.10)   c/b = {c / b_s:.2f}")
    print(f"b/a by best run (least disturbed by other load) = "
          f"{min(r['s'] for r in b_runs) / min(r['work_s'] for r in a_runs):.3f}")
    print(f"farm time outside render calls: {b_out:.2f} s = {b_out / len(frames) * 1000:.0f} ms/frame "
          f"(direct: {a_out:.2f} s, open + settings); import bpy {med(c_import):.2f} s per process in c")
    best_render = min(sum(r["per_frame"]) for r in a_runs)
    print(f"b/a from the time outside render calls (insensitive to render-speed noise): "
          f"1 + ({b_out:.2f} - {a_out:.2f}) / {best_render:.2f} (a's fastest render total) = "
          f"{1 + (b_out - a_out) / best_render:.3f}")
    print(f"CPU of the coordinator + worker daemon processes during b: {med(r['cpu'] for r in b_runs):.2f} s "
          f"= {med(r['cpu_coord'] for r in b_runs):.2f} + {med(r['cpu_daemon'] for r in b_runs):.2f} (taken from the {os.cpu_count()} cores the render uses)")
    print(f"farm start-up, excluded from b: {startup['total_s']:.1f} s")
    if p_runs:
        print_phases(p_runs, len(frames))
    ok = True
    for i in range(args.repeat):
        same, note = compare(tmp / f"a{i}", tmp / f"b{i}", frames)
        ok &= same == len(frames)
        print(f"pixels: farm run {i + 1}: {same}/{len(frames)} frames identical to direct (a)" +
              (f" — {note}" if note else ""))
    c_frames = frames[:1] if args.skip_c else frames
    same, note = compare(tmp / "a0", c_dir, c_frames)
    print(f"pixels: per-process (c): {same}/{len(c_frames)} frames identical to direct (a)" + (f" — {note}" if note else ""))
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
