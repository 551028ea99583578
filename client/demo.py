"""``make demo``: a whole farm on this machine, end to end.

Starts `farm serve` and two `farm worker` daemons on loopback, submits the sample turntable as a
24-frame job the way a creator would (hash, upload only what is missing, create the job), follows it with
a progress bar, downloads the frames and says where everything is. Then the Stable Diffusion part
(:func:`client.diffusion_cli.demo_run`): a txt2img batch with the tiny model, and an img2img job chained on a
render job of four frames. Stops every process at the end (also on Ctrl-C). Everything lives under
``.demo/`` in the repository.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from client import diffusion_cli, localfarm, payments_cli
from client.cli import upload_scene, wait_for_job

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_scenes" / "turntable.blend"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run the Renderhive demo")
    ap.add_argument("--dir", default=str(REPO / ".demo"))
    ap.add_argument("--frames", default="1-24")
    ap.add_argument("--resolution-percent", type=int, default=50)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the farm and its web page serving until Ctrl-C")
    args = ap.parse_args(argv)
    con = Console()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    http = 8000 if localfarm.port_free(8000) else None
    zmq = 5555 if localfarm.port_free(5555) else None
    procs: list[localfarm.Proc] = []
    try:
        con.rule("[bold]Renderhive demo")
        coord = localfarm.Coordinator(root / "coordinator", zmq_port=zmq, http_port=http)
        procs.append(coord)
        coord.start()
        con.print(f"coordinator: API {coord.url}  ·  workers connect to {coord.endpoint}  ·  log {coord.log}")
        models = diffusion_cli.demo_build_model(root, con)  # before the workers: they find it when they start
        threads = str(max(1, (os.cpu_count() or 1) // args.workers))  # diffusion runtimes split the cores
        for i in range(1, args.workers + 1):
            w = localfarm.WorkerProc(root / f"worker{i}", coord, f"demo-worker-{i}", models=[models],
                                     env=localfarm.process_env({"RENDERHIVE_WALLET": payments_cli.demo_wallet(i),
                                                                "RENDERHIVE_DIFFUSION_THREADS": threads}))
            procs.append(w.start())
        admin = coord.admin
        with con.status(f"starting {args.workers} workers (each loads Blender once and keeps it loaded)"):
            localfarm.wait_workers(admin, args.workers, timeout=120)
        for w in admin.workers():
            devices = ", ".join(f"{d.get('type')} {d.get('name', '')}" for d in w["devices"]) or "CPU"
            con.print(f"worker {w['id']}: {devices}")
        creator = coord.creator("demo-artist")
        con.print(f"creator token for this demo: export RENDERHIVE_URL={coord.url} RENDERHIVE_TOKEN={creator.token}")

        sha, sent = upload_scene(creator, SAMPLE, quiet=False)
        con.print(f"uploaded {SAMPLE.name}: {sent} bytes")
        t0 = time.monotonic()
        job = creator.submit(scene_sha256=sha, scene_name=SAMPLE.name, name="turntable", frames=args.frames,
                             chunk=1, resolution_percent=args.resolution_percent, samples=args.samples,
                             client_key=f"demo-{sha[:12]}")
        con.print(f"job {job['id']}: {job['tasks']['total']} tasks, frames {args.frames}")
        job = wait_for_job(creator, job["id"], quiet=False)
        if job["status"] != "rendered":
            con.print(f"[red]job {job['id']} ended {job['status']}: {job['error']}")
            return 1
        wall = time.monotonic() - t0
        # payments (full-resolution files are released on approval): approve the render job; each worker's tokens before and after its payout
        payments_cli.demo_payments(con, creator, job["id"], {f"demo-worker-{i}": payments_cli.demo_wallet(i)
                                                             for i in range(1, args.workers + 1)})
        out = root / "frames"
        paths = creator.download_results(job["id"], out)
        _sha, resent = creator.upload_if_missing(SAMPLE)
        outs = creator.outputs(job["id"])
        per_worker: dict[str, int] = {}
        for o in outs:
            per_worker[o["worker_id"]] = per_worker.get(o["worker_id"], 0) + 1
        render_s = sum(o["render_seconds"] for o in outs)
        con.rule("[bold green]done")
        con.print(f"{len(paths)} frames rendered in {wall:.1f} s wall ({render_s:.1f} s of rendering) by "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(per_worker.items())))
        con.print(f"re-submitting the same scene would upload {resent} bytes (content-addressed blobs)")
        checks = creator.job(job["id"]).get("checks", [])
        verdicts: dict[str, int] = {}
        for c in checks:
            verdicts[c["status"]] = verdicts.get(c["status"], 0) + 1
        standing = ", ".join(f"{w['id']} {w['tier']} ({w['reputation']:.2f}, {w['checks_passed']} checks passed)"
                             for w in creator.workers())
        con.print(f"spot checks (re-rendered by another worker and compared): "
                  f"{', '.join(f'{n} {s}' for s, n in sorted(verdicts.items())) or 'none'}; workers: {standing}")
        con.print(f"[bold]frames:[/] {out}/frame_0001.png … {paths[-1].name}")
        if diffusion_cli.demo_run(con, creator, sha, root):
            return 1
        con.print(f"logs: {root}/*/*.log   database: {coord.data / 'farm.db'}")
        if args.keep:
            con.print(f"[bold]approval page:[/] {coord.url}/jobs — sign in with the creator token above; "
                      "Ctrl-C stops the farm")
            while all(p.alive for p in procs):
                time.sleep(1)
        else:
            con.print("the farm is stopped now; `make demo DEMO_ARGS=--keep` keeps it serving so you can review "
                      "the jobs in a browser")
        return 0
    except (localfarm.ApiError, TimeoutError, RuntimeError) as exc:
        con.print(f"[red]demo failed: {exc}")
        for p in procs:
            con.print(f"--- {p.log}\n{p.tail(20)}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with con.status("stopping the farm"):
            for p in reversed(procs):
                p.stop()


if __name__ == "__main__":
    sys.exit(main())
