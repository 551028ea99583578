"""Time to first frame: from ``submit`` returning to the first preview on the job page, measured from outside.

    python bench/first_frame.py [--quick] [--repeat R] [--percent P] [--samples S] [--keep]

Two farms side by side (each ``farm serve`` + one ``farm worker``, as bench/overhead.py starts them:
CurveZMQ, the embedded escrow, a deposit per job), jobs alternating between them:

* **push** — the code as it is: the job page's live stream (``/jobs/{id}/live``) is woken by the commit
  that stored the result (:mod:`farm.store.changes`);
* **poll** — the same ``farm serve`` with that wake taken out, so the stream reads the job every 0.5 s
  (:data:`farm.store.changes.POLL_SECONDS`), as it did before.

Each round submits a one-frame job of ``sample_scenes/turntable.blend`` (160x120, 16 samples; the scene is
uploaded once and the probe render of a new scene happens in a warm-up job per farm), opens the page's
live stream as the creator (signed in through the login form) the moment ``submit`` returns, waits for the
event that lists the first output, then downloads that preview. Printed per mode (medians over rounds):
submit returned → the job queued (deposit confirmed) → first lease → its render began (first PROGRESS) →
result stored (coordinator timestamps, the SQLite event log) → the page's stream showed it → preview bytes
in hand; and push/poll of the whole. Checks that each preview decodes as half the frame's size (a watermarked preview).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import PY, SCENE, Farm  # noqa: E402

POLL_ONLY = ("import asyncio, sys\n"
             "import farm.store.changes as c\n"
             "async def _poll(job_id, since, timeout):\n"
             "    await asyncio.sleep(timeout)\n"
             "    return False\n"
             "c.HUB.wait = _poll  # the stream reads again after POLL_SECONDS, whatever was committed\n"
             "from client.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")


class PageFarm(Farm):
    """A farm whose ``farm serve`` runs with or without the commit wake (``push``)."""

    def __init__(self, tmp: Path, push: bool):
        super().__init__(tmp)
        self.push = push
        self.http_client: httpx.Client | None = None

    def _spawn(self, name: str, *args: str):
        if name != "serve" or self.push:
            return super()._spawn(name, *args)
        import subprocess
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen([PY, "-c", POLL_ONLY, *args], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(p)
        return p

    def sign_in(self) -> None:
        http = httpx.Client(base_url=f"http://127.0.0.1:{self.http}", timeout=120)
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text).group(1)
        r = http.post("/login", data={"csrf": csrf, "token": self.client.token}, follow_redirects=False)
        if r.status_code != 303:
            raise SystemExit(f"signing in to the page failed: {r.status_code} {r.text[:200]}")
        self.http_client = http

    def first_frame(self, sha: str, frame: int, samples: int, percent: int) -> dict[str, float]:
        """Submit one frame; seconds from submit returning to each milestone."""
        job = self.client.submit(scene_sha256=sha, scene_name=SCENE.name, frames=str(frame), chunk=1,
                                 format="PNG", samples=samples, resolution_percent=percent, name="first frame")
        t0 = time.time()
        http = self.http_client
        seen = name = None
        with http.stream("GET", f"/jobs/{job['id']}/live") as resp:
            if resp.status_code != 200:
                raise SystemExit(f"the live stream answered {resp.status_code}")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    view = json.loads(line[6:])
                    if view.get("outputs"):
                        seen, name = time.time(), view["outputs"][0]
                        break
                    if view.get("status") in ("failed", "canceled"):
                        raise SystemExit(f"job {job['id']} {view['status']}; logs in {self.tmp}")
        png = http.get(f"/jobs/{job['id']}/previews/{name}")
        got = time.time()
        if png.status_code != 200:
            raise SystemExit(f"preview {name}: {png.status_code}")
        size = Image.open(io.BytesIO(png.content)).size
        db = sqlite3.connect(f"file:{self.data / 'farm.db'}?mode=ro", uri=True)
        try:
            task = dict(db.execute("SELECT new, MIN(at) FROM event WHERE job_id = ? AND kind = 'task' GROUP BY new",
                                   (job["id"],)).fetchall())
            jobs = dict(db.execute("SELECT new, MIN(at) FROM event WHERE job_id = ? AND kind = 'job' GROUP BY new",
                                   (job["id"],)).fetchall())
        finally:
            db.close()
        return {"queued": jobs.get("queued", t0) - t0, "leased": task["assigned"] - t0,
                "render began": task.get("running", task["assigned"]) - t0, "stored": task["done"] - t0,
                "on the page": seen - t0, "preview in hand": got - t0, "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds a mode")
    ap.add_argument("--repeat", type=int, default=None, help="rounds a mode (default 8, --quick 3)")
    ap.add_argument("--percent", type=int, default=50)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = ap.parse_args()
    rounds = args.repeat or (3 if args.quick else 8)
    tmp = Path(tempfile.mkdtemp(prefix="renderhive-first-frame-"))
    farms = {"push": PageFarm(tmp / "push", True), "poll": PageFarm(tmp / "poll", False)}
    try:
        shas = {}
        for mode, f in farms.items():
            (tmp / mode).mkdir(parents=True)
            f.start()
            f.sign_in()
            shas[mode], _ = f.client.upload_if_missing(SCENE)
            f.first_frame(shas[mode], 1, args.samples, args.percent)  # warm-up: probe, Blender start, scene load
        runs: dict[str, list[dict]] = {m: [] for m in farms}
        frame = (round(320 * args.percent / 100), round(240 * args.percent / 100))
        want = (round(frame[0] / 2), round(frame[1] / 2))  # a preview: half the frame at most (farm.web.previews)
        for r in range(rounds):
            for mode in (("push", "poll") if r % 2 == 0 else ("poll", "push")):
                m = farms[mode].first_frame(shas[mode], 2 + r, args.samples, args.percent)
                if m.pop("size") != want:
                    raise SystemExit(f"{mode}: the preview is not {want[0]}x{want[1]} (half of {frame[0]}x{frame[1]})")
                runs[mode].append(m)
        keys = list(runs["push"][0])
        print(f"time to first frame, {rounds} rounds a mode, {frame[0]}x{frame[1]} {args.samples} samples, one worker"
              " (seconds from submit returning; medians)")
        print(f"{'milestone':<18}" + "".join(f"{m:>10}" for m in farms))
        for k in keys:
            print(f"{k:<18}" + "".join(f"{statistics.median(x[k] for x in runs[m]):>10.3f}" for m in farms))
        push = statistics.median(x["on the page"] for x in runs["push"])
        poll = statistics.median(x["on the page"] for x in runs["poll"])
        seen = [x["on the page"] - x["stored"] for x in runs["push"]]
        print(f"push/poll, submit → on the page: {push / poll:.3f}; result stored → on the page, push: median "
              f"{statistics.median(seen) * 1000:.0f} ms, max {max(seen) * 1000:.0f} ms; poll: median "
              f"{statistics.median(x['on the page'] - x['stored'] for x in runs['poll']) * 1000:.0f} ms")
    finally:
        for f in farms.values():
            f.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
