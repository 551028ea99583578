"""``farm``: the command line of Renderhive (coordinator, worker and creator commands).

Client commands take ``--url``/``--token`` (or RENDERHIVE_URL / RENDERHIVE_TOKEN) and ``--json`` for
scripts. Long work (hashing, uploads, rendering, downloads) shows rich progress bars.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from client import payments_cli
from client.api import ApiError, Client, file_sha256, parse_wxh

FINAL = {"rendered", "approved", "paid", "canceled", "failed", "rejected"}


def _console():
    from rich.console import Console
    return Console(stderr=True)


def _progress():
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=_console(), transient=True)


def _out(args, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=None if isinstance(data, (int, str)) else 2, default=str))
    else:
        print(human)


# ------------------------------------------------------------------ creator commands
def upload_scene(client: Client, scene: Path, quiet: bool) -> tuple[str, int]:
    size = scene.stat().st_size
    if quiet:
        return client.upload_if_missing(scene)
    with _progress() as prog:
        t = prog.add_task(f"hashing {scene.name}", total=size)
        sha = file_sha256(scene, lambda n: prog.advance(t, n))
        missing = client.missing([sha])
        if not missing:
            return sha, 0
        prog.reset(t, description=f"uploading {scene.name}", total=size)
        client.upload_blob(scene, sha, lambda n: prog.advance(t, n))
    return sha, size


def upload_project(client: Client, scene: Path, args) -> tuple[str, int, dict[str, Any]]:
    """Trace the scene's project (client.project), refuse what cannot ship, upload what the farm lacks.
    Returns (scene sha256, bytes sent, the job fields that name the project)."""
    from client import project as proj
    try:
        pr = proj.build(scene, Path(args.project_root) if args.project_root else None)
    except proj.ProjectError as exc:
        raise ApiError(str(exc)) from None
    try:
        if pr.missing and not args.allow_missing:
            raise ApiError(str(proj.missing_error(pr)))
        say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
        say(f"project {pr.root}: {len(pr.manifest.files)} files, {pr.total_bytes} bytes (traced by {pr.tracer} "
            f"in {pr.seconds:.2f} s)" + (f"; absolute paths made relative in a copy of {', '.join(pr.rewritten)}"
                                         if pr.rewritten else "") + (f"; {pr.tracer_note}" if pr.tracer_note else ""))
        if pr.missing:
            say(f"warning: rendering without {len(pr.missing)} missing file(s) (--allow-missing): "
                + ", ".join(repr(d.written) for d in pr.missing[:10]))
        above = int(args.resumable_above * (1 << 20)) if args.resumable_above is not None else None
        if args.json:
            stats = proj.upload(client, pr, resumable_above=above)
        else:
            with _progress() as prog:
                t = prog.add_task("uploading", total=pr.total_bytes)
                client.on_wait = lambda message: prog.update(t, description=message)   # a 429/503 waited out
                stats = proj.upload(client, pr, lambda name, n: prog.update(t, advance=n, description=name),
                                    resumable_above=above)
        if stats.get("waited_s"):
            say(f"waited {stats['waited_s']:.0f} s in all for the farm's upload limit ({stats['requests']} upload "
                "requests)")
        fields: dict[str, Any] = {"project": pr.manifest.to_json()}
        if pr.missing:
            fields["missing"] = pr.missing_report()
        return pr.manifest.files[pr.scene], stats["bytes_sent"], fields
    finally:
        pr.close()


def wait_for_job(client: Client, job_id: int, quiet: bool) -> dict[str, Any]:
    """Follow a job until it is rendered or final, with a live progress bar of frames."""
    view = client.job(job_id)
    if quiet:
        while view["status"] not in FINAL:
            time.sleep(0.5)
            view = client.job(job_id)
        return view
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[state]}"), console=_console()) as prog:
        tiled = bool((view.get("spec") or {}).get("tiles"))  # a tiled job's progress counts tiles
        done, total = ("units_done", "units_total") if tiled else ("frames_done", "frames_total")
        t = prog.add_task(f"job {job_id}" + (" tiles" if tiled else ""), total=view[total] or 1,
                          state=view["status"])
        while True:
            running = view["tasks"].get("running", 0) + view["tasks"].get("assigned", 0)
            prog.update(t, completed=view[done], state=f"{view['status']} · {running} rendering")
            if view["status"] in FINAL:
                break
            time.sleep(0.5)
            view = client.job(job_id)
    return view


def cmd_submit(args, client: Client) -> int:
    scene = Path(args.scene)
    if not scene.is_file():
        raise ApiError(f"{scene} does not exist: give the path of a saved .blend file")
    resolution = parse_wxh(args.resolution, "--resolution", "1920x1080")
    sha, sent, project = upload_project(client, scene, args)
    optional = {"resolution": resolution, "tiles": args.tiles, "overscan": args.overscan, "video": args.video or None,
                "time_limit": args.time_limit, "passes": args.passes or None, **project}
    job = client.submit(scene_sha256=sha, scene_name=scene.name, frames=args.frames, chunk=args.chunk,
                        format=args.format, color_depth=args.color_depth, samples=args.samples,
                        resolution_percent=args.resolution_percent, priority=args.priority,
                        min_tier=args.min_tier or "", name=args.name or scene.stem,
                        **{k: v for k, v in {**optional, **payments_cli.priced_args(args)}.items() if v is not None})
    if not args.json:
        print(f"job {job['id']} {'submitted' if job['status'] == 'probing' else 'queued'}: {job['tasks']['total']} "
              f"tasks, {job['frames_total']} frames "
              f"({str(sent) + ' bytes uploaded' if sent else 'everything already on the farm, 0 bytes uploaded'})")
        if job["status"] == "probing":
            job = wait_for_probe(client, job)
        if quote := (job.get("spec") or {}).get("quote"):
            print(payments_cli.quote_line(quote))
    return follow_submitted(args, client, job)


PROBE_WAIT = 600.0
"""Seconds `farm submit` waits for a probe render before it prints the quote it has."""


def wait_for_probe(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    """A new scene is probed first (one frame at low resolution): say so, wait for it, and return the job
    with the quote made from it (or ended: a failed probe fails the job, a max price cancels it)."""
    print("probing: the farm has not rendered this scene yet, so one frame at low resolution and samples "
          "measures it before the quote (cost, deposit, ETA) is made...", flush=True)
    deadline = time.monotonic() + PROBE_WAIT
    while job["status"] == "probing" and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.job(job["id"])
    probe = job.get("probe") or {}
    if "seconds" in probe:
        print(f"probed in {probe['seconds']:.2f} s: about {probe['seconds_per_unit']:.3f} s a unit of work")
    elif job["status"] == "probing":
        print(f"still probing after {PROBE_WAIT:.0f} s (no free worker?): the quote below is the guess until then")
    if job["status"] in ("failed", "canceled"):
        print(f"job {job['id']} {job['status']}: {job['error']}")
    return job


def add_follow_args(parser: argparse.ArgumentParser, what: str) -> None:
    """The options every submit command shares: priority, name, and what to do once it is done."""
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--min-tier", choices=["new", "trusted", "top"], default=None,
                        help="only workers of this reputation tier or better (see `farm workers`)")
    payments_cli.add_priced_args(parser)
    parser.add_argument("--name", default="")
    parser.add_argument("--wait", action="store_true", help="follow progress until it is done")
    parser.add_argument("--out", default=None, help=f"with --wait --approve: download the {what} here")
    parser.add_argument("--approve", action="store_true",
                        help="with --wait: approve as soon as it is done (pays the workers) and download")


def follow_submitted(args, client: Client, job: dict[str, Any]) -> int:
    """After a submit: ``--wait`` follows the job, ``--out`` downloads its results, ``--json`` prints its id."""
    if args.wait:
        job = wait_for_job(client, job["id"], args.json)
        if not args.json:
            print(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job["error"] else ""))
        if args.out and job["status"] == "rendered":
            if getattr(args, "approve", False):
                job = client.approve(job["id"])
                paths = client.download_results(job["id"], Path(args.out))
                if not args.json:
                    print(f"approved; {len(paths)} files in {Path(args.out).resolve()}")
            elif not args.json:
                print(f"review the previews at {client.url}/jobs/{job['id']}, then `farm approve {job['id']}` "
                      f"and `farm results {job['id']} --out {args.out}` (or submit with --approve)")
    if args.json:
        print(job["id"])
    return 0 if job["status"] not in ("failed", "canceled") else 1


def cmd_status(args, client: Client) -> int:
    if args.job is not None:
        job = client.job(args.job)
        if args.json:
            _out(args, job, "")
            return 0
        from rich.table import Table
        c = _console()
        c.print(f"[bold]job {job['id']}[/] {job['name']} — {job['status']}, {job['frames_done']}/"
                f"{job['frames_total']} frames ({job['progress']:.0%})" + (f"\n[red]{job['error']}[/]" if job["error"] else ""))
        q = job.get("queue")
        if q:
            eta = f"about {q['eta_seconds']:.0f} s" if q["eta_seconds"] is not None else "unknown"
            c.print(f"queue: position {q['position']} ({q['tasks_ahead']} tasks ahead, {q['tasks_left']} of its own "
                    f"left), {q['slots_able']} slots on {q['workers_able']} workers can run it; ETA {eta} "
                    f"at {q['seconds_per_task']:.2f} s a task ({q['basis']})" + (f" — {q['note']}" if q["note"] else ""))
        table = Table("task", "frames", "status", "attempt", "worker", "progress", "error")
        for t in job["task_list"]:
            fr = t["frames"] or []
            table.add_row(str(t["index"]), f"{fr[0]}-{fr[-1]}" if len(fr) > 1 else str(fr[0] if fr else ""),
                          t["status"], str(t["attempt"]), t["worker_id"] or "", f"{t['progress'][0]}/{t['progress'][1]}",
                          t["error"][:60])
        c.print(table)
        return 0
    jobs = client.jobs()
    if args.json:
        _out(args, jobs, "")
        return 0
    from rich.table import Table
    table = Table("job", "name", "status", "frames", "progress", "created")
    for j in jobs:
        table.add_row(str(j["id"]), j["name"], j["status"], f"{j['frames_done']}/{j['frames_total']}",
                      f"{j['progress']:.0%}", time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"])))
    _console().print(table)
    return 0


def cmd_results(args, client: Client) -> int:
    outs = client.outputs(args.job)
    if args.json:
        paths = client.download_results(args.job, Path(args.out))
        _out(args, [str(p) for p in paths], "")
        return 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    with Progress(TextColumn("downloading"), BarColumn(), MofNCompleteColumn(), console=_console()) as prog:
        t = prog.add_task("", total=len(outs))
        paths = client.download_results(args.job, Path(args.out), lambda _n: prog.advance(t))
    print(f"{len(paths)} files in {Path(args.out).resolve()}")
    return 0


def cmd_cancel(args, client: Client) -> int:
    job = client.cancel(args.job)
    _out(args, job, f"job {job['id']} {job['status']}")
    return 0


def cmd_workers(args, client: Client) -> int:
    args.key = args.key or args.key_option
    if args.action != "list":
        if not args.key:
            raise ApiError(f"farm workers {args.action} needs a worker's public key"
                           + (" or worker id" if args.action == "revoke" else "")
                           + " (`farm workers` lists them; `farm worker --print-key` prints a worker's own)")
        done = (client.allow_worker if args.action == "allow" else client.revoke_worker)(args.key)
        if args.action == "allow":
            _out(args, done, f"key {done['key']} " + ("allowed" if done["added"] else "was allowed already")
                 + ("" if done["mode"] != "open" else " (this farm admits any key: --admit open)"))
        else:
            _out(args, done, f"key {done['key']} revoked: {done['connections']} connection(s) dropped "
                 f"(workers {', '.join(done['workers']) or 'none'}), {done['leases_requeued']} lease(s) requeued")
        return 0
    workers = client.workers()
    if args.json:
        _out(args, workers, "")
        return 0
    from rich.table import Table
    table = Table("worker", "key", "online", "devices", "slots", "tier", "reputation", "checks ok/bad",
                  "speed wu/s", "done", "failed", "render s")
    for w in workers:
        devs = ", ".join(f"{d.get('type')} {d.get('name', '')}".strip() for d in w["devices"]) or "CPU"
        speed = f"{w['speed']:.0f}" if w.get("speed") else "-"
        key = w.get("public_key") or ""
        table.add_row(w["id"], key[:8] + "…" if key else "-", "yes" if w["online"] else "no", devs,
                      str(w["slots"]), w.get("tier", "new"),
                      f"{w.get('reputation', 0.5):.3f}", f"{w.get('checks_passed', 0)}/{w.get('checks_failed', 0)}",
                      speed, str(w["tasks_done"]), str(w["tasks_failed"]), f"{w['render_seconds']:.1f}")
    _console().print(table)
    return 0


def cmd_user(args, client: Client) -> int:
    if args.set_credit is not None:
        user = client.set_credit_line(args.name, args.set_credit == "on")
        _out(args, user, f"user {user['name']}: credit line {'on' if user['credit_line'] else 'off'}")
        return 0
    user = client.create_user(args.name, args.credit_line)
    _out(args, user, f"user {user['name']} created; token (shown once): {user['token']}"
                     + ("; credit line on: its jobs start before their deposit is confirmed" if args.credit_line else ""))
    return 0


# ------------------------------------------------------------------ daemons
def cmd_serve(args) -> int:
    import asyncio

    from farm.server import serve
    if args.print_key:  # made on first use, as `farm serve` would
        from common.keys import load_or_create_keypair
        print(load_or_create_keypair(Path(args.data) / "curve", "server", "Renderhive coordinator")[0].decode())
        return 0
    if args.models:  # read by farm.kinds.diffusion when it checks prompts
        os.environ["RENDERHIVE_MODELS"] = os.pathsep.join(args.models)
    from common.logs import setup
    setup()
    from farm.payments.ledger import ChainConfigError
    try:
        asyncio.run(serve(Path(args.data), args.db, args.bind, args.http, args.chain_rpc, args.chain_key_file,
                          args.admit, args.require_sandbox, args.sealed))
    except ChainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _vram_limit(text: str) -> int:
    from worker.device_memory import parse_limit
    try:
        return parse_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_worker(args) -> int:
    from common.keys import KeyFileError, read_public_key
    from worker import keys
    if args.print_key:
        print(keys.worker_keypair(Path(args.cache))[0].decode())
        return 0
    if not args.server_key:
        print("error: --server-key is needed: the coordinator's public key, which `farm serve` prints at start "
              "(or `farm serve --print-key --data DIR`); the worker connects to the holder of that key only",
              file=sys.stderr)
        return 2
    try:
        server_key, token = read_public_key(args.server_key), keys.enroll_token(args.enroll_token)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from worker import availability as avail
    try:
        schedule = avail.parse_schedule(args.schedule) if args.schedule else None
        idle = avail.IdleDetector(args.idle_minutes, args.idle_cpu) if args.idle_only else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rules = avail.Availability(schedule, idle, grace=args.pause_grace) if schedule or idle else None
    if rules:
        print("worker: takes work " + " and ".join(
            ([f"during {args.schedule} (local time)"] if schedule else [])
            + ([f"while this host is idle ({args.idle_minutes:g} min with other programs under {args.idle_cpu:g} % "
                "CPU and no terminal input)"] if idle else []))
            + f"; a task running when that ends gets {args.pause_grace:g} s to finish, else it is handed back",
            flush=True)
    from worker.daemon import main
    from worker.sandbox import SandboxUnavailable
    try:
        main(args.coordinator, Path(args.cache), args.slots, args.wallet, args.gpus, args.worker_id, args.models,
             benchmark=args.benchmark, server_key=server_key, enroll_token=token, sandbox=not args.no_sandbox,
             memory_bytes=int(args.max_memory * 1024**3) if args.max_memory else None, availability=rules,
             vram_limit=args.vram_limit)
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farm", description="Renderhive render farm")
    sub = p.add_subparsers(dest="command", required=True)

    def client_cmd(name: str, help: str):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--url", default=os.environ.get("RENDERHIVE_URL"), help="coordinator API URL")
        sp.add_argument("--token", default=os.environ.get("RENDERHIVE_TOKEN"), help="API token")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    s = sub.add_parser("serve", help="run the coordinator and the HTTP API")
    s.add_argument("--db", default=None, help="database URL (default: sqlite in DATA; or DATABASE_URL)")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555", help="worker plane endpoint (ZeroMQ)")
    s.add_argument("--http", default="127.0.0.1:8000", help="HTTP API host:port")
    s.add_argument("--data", default="farm-data", help="data directory (database, blobs, admin token)")
    s.add_argument("--chain-rpc", default=None, help="payments chain: embedded (default, in-process EVM), off, "
                   "or a JSON-RPC URL (or CHAIN_RPC_URL / RENDERHIVE_CHAIN_RPC)")
    s.add_argument("--chain-key-file", default=None, help="with a URL: file holding the operator's private key")
    s.add_argument("--models", action="append", help="model folders whose tokenizers check prompt lengths at "
                   "submit (repeatable; default RENDERHIVE_MODELS)")
    s.add_argument("--admit", choices=["auto", "open", "token", "allowlist"],
                   default=os.environ.get("RENDERHIVE_ADMIT", "auto"),
                   help="which worker keys may connect (or RENDERHIVE_ADMIT): open = any key; token = keys that "
                   "enroll with DATA/curve/enroll.token, and listed ones; allowlist = only keys in DATA/curve/allowed "
                   "(farm workers allow KEY); auto (default) = open on a loopback --bind, token otherwise")
    s.add_argument("--require-sandbox", action="store_true",
                   help="admit only workers that run scenes in the OS sandbox (refuse `farm worker --no-sandbox`)")
    s.add_argument("--sealed", default=os.environ.get("RENDERHIVE_SEALED", "auto"),
                   help="the sealed blob channel (big inputs sealed once and sent to every worker by sendfile over "
                   "HTTP; their key goes over CurveZMQ): auto (default: --bind's host, its port + 1), PORT, "
                   "HOST:PORT, or off (big inputs as CurveZMQ chunks, ~2x slower to many workers); or RENDERHIVE_SEALED")
    s.add_argument("--print-key", action="store_true",
                   help="print the coordinator's public key (made on first use) for workers' --server-key, and exit")
    s.set_defaults(func=cmd_serve, needs_client=False)

    w = sub.add_parser("worker", help="run a worker daemon on this GPU host")
    w.add_argument("--coordinator", default="tcp://127.0.0.1:5555")
    w.add_argument("--slots", type=int, default=1, help="tasks rendered at once")
    w.add_argument("--cache", default="worker-cache", help="cache directory (blobs, worker id)")
    w.add_argument("--wallet", default=os.environ.get("RENDERHIVE_WALLET", ""),
                   help="payout address (0x…; or RENDERHIVE_WALLET): earnings are credited to it in the escrow")
    w.add_argument("--gpus", default="all", help="GPUs for Cycles: all, none, or indices like 0,1")
    w.add_argument("--worker-id", default=None, help="stable worker id (default: stored in the cache dir)")
    w.add_argument("--server-key", default=os.environ.get("RENDERHIVE_SERVER_KEY"),
                   help="the coordinator's public key (Z85, printed by `farm serve`), or a file holding it; or "
                   "RENDERHIVE_SERVER_KEY. The worker talks to the holder of this key only")
    w.add_argument("--enroll-token", default=os.environ.get("RENDERHIVE_ENROLL_TOKEN", ""),
                   help="the farm's enrollment token (or a file holding it; or RENDERHIVE_ENROLL_TOKEN): admits "
                   "this worker's key on a farm in token mode")
    w.add_argument("--no-sandbox", action="store_true",
                   help="run scenes and models WITHOUT the OS sandbox (bubblewrap): they can then read and write "
                   "this machine's files and reach the network. Only for a host that cannot sandbox, and only "
                   "with scenes you trust")
    w.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="memory each runtime child may use, in GiB (default: 3/4 of this machine's RAM)")
    w.add_argument("--vram-limit", type=_vram_limit, default=None, metavar="SIZE",
                   help="most device memory to lend one diffusion task (GiB, or e.g. 6G, 512M): the farm books no "
                   "bigger task here (default: the GPU's free memory, or --max-memory on a CPU worker)")
    w.add_argument("--print-key", action="store_true",
                   help="print this worker's public key (made on first use, in the cache dir) and exit")
    w.add_argument("--models", action="append", help="diffusion model folder, or a folder of them (repeatable; "
                   "default RENDERHIVE_MODELS); the Hugging Face hub cache is searched too")
    w.add_argument("--schedule", default=os.environ.get("RENDERHIVE_SCHEDULE"), metavar="HH:MM-HH:MM[,...]",
                   help="take work only in these local-time windows, e.g. 22:00-08:00 (wraps midnight) or "
                   "00:00-07:30,12:00-13:00 (or RENDERHIVE_SCHEDULE); outside them the worker stays connected "
                   "but takes no task")
    w.add_argument("--idle-only", action="store_true",
                   help="take work only while this host is idle: other programs' CPU below --idle-cpu and no "
                   "terminal input, for --idle-minutes (desktop mouse/keyboard and GPU use are not seen)")
    w.add_argument("--idle-minutes", type=float, default=10.0, help="with --idle-only: quiet minutes first (10)")
    w.add_argument("--idle-cpu", type=float, default=25.0, metavar="PERCENT",
                   help="with --idle-only: other programs' CPU use, in %% of the whole machine, that counts as "
                   "in use (25; 100 ignores the CPU)")
    w.add_argument("--pause-grace", type=float, default=120.0, metavar="SECONDS",
                   help="when the schedule closes or the host is in use: seconds a running task may take to "
                   "finish; one that cannot is handed back to the farm at once, without penalty (120)")
    wb = w.add_mutually_exclusive_group()
    wb.add_argument("--benchmark", dest="benchmark", action="store_const", const="force", default="auto",
                    help="measure the benchmark score again (default: reuse the cached score of this setup)")
    wb.add_argument("--no-benchmark", dest="benchmark", action="store_const", const="off",
                    help="skip the benchmark; the worker reports no score")
    w.set_defaults(func=cmd_worker, needs_client=False)

    sm = client_cmd("submit", "submit a .blend as a frame job")
    sm.add_argument("scene")
    sm.add_argument("--frames", default="1", help="frames like 1-24,30,40-50x2")
    sm.add_argument("--chunk", type=int, default=1, help="frames per task")
    sm.add_argument("--format", default="PNG", choices=["PNG", "EXR"])
    sm.add_argument("--color-depth", default=None, help="8/16 for PNG, 16/32 for EXR")
    sm.add_argument("--samples", type=int, default=None)
    sm.add_argument("--passes", default=None, metavar="depth,normal,mask",
                    help="also write these render passes of each frame as PNGs (depth_0001.png…), normalised "
                         "as ControlNet conditions")
    sm.add_argument("--time-limit", type=int, default=None, metavar="SECONDS",
                    help="seconds one frame may take on a worker (default: the worker's own limit)")
    sm.add_argument("--resolution-percent", type=int, default=None)
    sm.add_argument("--resolution", default=None, help="output size WIDTHxHEIGHT in pixels (percentage 100)")
    sm.add_argument("--tiles", default=None, help="split each frame into COLSxROWS tiles (1x1 to 16x16) "
                    "rendered by different workers and stitched exactly")
    sm.add_argument("--overscan", type=int, default=None, help="tile margin in pixels (default: from the scene)")
    sm.add_argument("--video", action="store_true", help="also encode the frames to video.mp4 (H.264)")
    sm.add_argument("--project-root", default=None, help="the folder whose files the scene may read (default: "
                    "the scene's folder); nothing outside it is shipped")
    sm.add_argument("--allow-missing", action="store_true", help="render although files the scene reads are "
                    "missing (Blender renders missing textures pink); the job page lists them")
    sm.add_argument("--resumable-above", type=float, default=None, metavar="MiB",
                    help="upload files of this many MiB or more resumably: a dropped connection is resumed "
                    "where the farm's copy ends (default 64, or RENDERHIVE_RESUMABLE_MIB)")
    add_follow_args(sm, "frames")
    sm.set_defaults(func=cmd_submit)

    st = client_cmd("status", "list jobs, or show one job")
    st.add_argument("job", nargs="?", type=int)
    st.set_defaults(func=cmd_status)

    r = client_cmd("results", "download a job's outputs")
    r.add_argument("job", type=int)
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_results)

    c = client_cmd("cancel", "cancel a job")
    c.add_argument("job", type=int)
    c.set_defaults(func=cmd_cancel)

    wk = client_cmd("workers", "list workers; allow or revoke a worker's key (admin)")
    wk.add_argument("action", nargs="?", choices=["list", "allow", "revoke"], default="list",
                    help="allow KEY: admit a worker's public key; revoke KEY|WORKER_ID: refuse it from now on, "
                    "drop its connection and requeue its tasks")
    wk.add_argument("key", nargs="?", help="a worker's public key (Z85), or for revoke a worker id")
    wk.add_argument("--key", dest="key_option", metavar="KEY",
                    help="the same, for a key that starts with '-' (write --key=KEY)")
    wk.set_defaults(func=cmd_workers)

    u = client_cmd("user", "create a creator account (admin token needed)")
    u.add_argument("name")
    u.add_argument("--credit-line", action="store_true",
                   help="lease its jobs before their deposit is confirmed in escrow (you carry the risk)")
    u.add_argument("--set-credit", choices=["on", "off"], default=None,
                   help="change an existing creator's credit line")
    u.set_defaults(func=cmd_user)

    from client.payments_cli import add_commands  # estimate, approve, reject, payouts, wallet
    add_commands(sub, client_cmd)
    from client import diffusion_cli  # submit-diffusion, models
    diffusion_cli.add_commands(sub, client_cmd)
    from client import stylise_cli  # stylise: render with passes, then ControlNets over them
    stylise_cli.add_commands(sub, client_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "needs_client", True):
        return args.func(args)
    client = Client(args.url, args.token)
    try:
        return args.func(args, client)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
