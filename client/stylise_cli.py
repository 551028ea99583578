"""``farm stylise SCENE``: one command that renders a scene's animation with render passes and stylises it
frame by frame with ControlNets over those passes, with fixed seeds (issue 20, part 2).

The steps, each an ordinary API call (the same as ``farm submit --passes`` then ``farm submit-diffusion
--control-from-job``):

1. upload the scene (skipped when the farm has it) and submit the render job with the passes the
   ControlNets take (``--passes``, default: the passes named by ``--control``), PNG frames;
2. submit the diffusion job over it at once: image i from frame i's passes, seed ``--seed + i``; the farm
   holds it until the render job is approved (fair exchange: frames nobody paid for feed no job);
3. wait for the render; approve it (``--approve``, or a yes at the prompt on a terminal; otherwise stop and
   say how to go on: the diffusion job waits on the farm, nothing is lost);
4. wait for the stylised images, approve them the same way and download them (``--out``), the render's
   frames and passes too (``OUT/render``).

Reproducible: the render is deterministic (Cycles with a fixed seed; bit-exact between like devices), every
image's seed is recorded, so running the command again renders and stylises anew and gives the same pixels
(``tests/client/test_stylise.py`` runs it twice). Bad input is refused before anything is submitted (a
ControlNet that takes no known pass, a pass not rendered); a diffusion job the farm refuses cancels the
render job just submitted for it, so no deposit is held for a render nobody will use.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from client.api import ApiError, Client, parse_wxh
from common.limits import RENDER_PASSES


def parse_controls(values: list[str]) -> list[dict[str, Any]]:
    """``--control PASS[:WEIGHT]`` → [{name, weight, render_pass}]: the ControlNet named like the pass it takes,
    or ``NAME=PASS[:WEIGHT]`` for a ControlNet named otherwise (e.g. ``sd-depth=depth:0.8``)."""
    if not values:
        raise ApiError("give at least one --control PASS[:WEIGHT] (a ControlNet workers hold, named like the render "
                       f"pass it takes: {', '.join(RENDER_PASSES)}; or NAME=PASS[:WEIGHT])")
    out = []
    for v in values:
        head, _, weight = v.partition(":")
        name, _, render_pass = head.partition("=")
        render_pass = render_pass or name
        if render_pass not in RENDER_PASSES:
            raise ApiError(f"--control {v!r}: which render pass does ControlNet {name!r} take? Name it like one "
                           f"({', '.join(RENDER_PASSES)}) or write NAME=PASS[:WEIGHT]")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ApiError(f"--control {v!r}: the weight after ':' must be a number, e.g. depth:0.8") from None
        out.append({"name": name, "weight": w, "render_pass": render_pass})
    return out


def parse_passes(text: str | None, controls: list[dict[str, Any]]) -> list[str]:
    passes = [p.strip() for p in (text or "").split(",") if p.strip()] or \
        list(dict.fromkeys(c["render_pass"] for c in controls))
    for c in controls:
        if c["render_pass"] not in passes:
            raise ApiError(f"ControlNet {c['name']!r} takes the {c['render_pass']} pass, which --passes "
                           f"{','.join(passes)} does not render: add it (--passes {','.join(passes + [c['render_pass']])})")
    return passes


def _confirm(args, question: str) -> bool:
    if args.approve:
        return True
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _wait(client: Client, job_id: int, args) -> dict[str, Any]:
    from client.cli import wait_for_job
    job = wait_for_job(client, job_id, args.json)
    if job["status"] != "rendered":
        raise ApiError(f"job {job_id} ended {job['status']}: {job['error'] or 'see farm status ' + str(job_id)}")
    return job


def _say(args, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def cmd_stylise(args, client: Client) -> int:
    from client.cli import upload_scene
    from client.diffusion_cli import model_ref, parse_loras, parse_size, read_prompts
    scene = Path(args.scene)
    if not scene.is_file():
        raise ApiError(f"{scene} does not exist: give the path of a saved .blend file")
    controls = parse_controls(args.control)
    passes = parse_passes(args.passes, controls)
    prompts = read_prompts(args)
    width, height = parse_size(args.size)
    model, digest = model_ref(args.model)
    resolution = parse_wxh(args.resolution, "--resolution", "1920x1080")
    sha, _ = upload_scene(client, scene, args.json)
    render = client.submit(**{k: v for k, v in {
        "scene_sha256": sha, "scene_name": scene.name, "frames": args.frames, "passes": passes, "format": "PNG",
        "samples": args.samples, "resolution_percent": args.resolution_percent, "resolution": resolution,
        "priority": args.priority, "name": f"{args.name or scene.stem} (render for stylise)"}.items()
        if v is not None})
    try:
        sd = client.submit_diffusion(
            model=model, model_hash=digest, prompts=prompts, negative=args.negative, seed=args.seed,
            steps=args.steps, guidance=args.guidance, width=width, height=height, scheduler=args.scheduler,
            per_task=args.per_task, control_from_job=render["id"], controls=controls,
            loras=parse_loras(args.lora) or None, priority=args.priority, name=f"{args.name or scene.stem} (stylised)")
    except ApiError:
        client.cancel(render["id"])  # the render was only for this job: hold no deposit for it
        raise
    spec = sd["spec"]
    _say(args, f"job {render['id']}: {render['frames_total']} frames of {scene.name} with passes "
               f"{','.join(passes)}; job {sd['id']}: {spec['images_total']} images of {spec['model']} with "
               + " + ".join(f"ControlNet {c['name']} x{c['weight']:g} on {c.get('pass', c['name'])}"
                            for c in spec.get("controls") or [])
               + f", seeds {spec['seed']}-{spec['seed'] + spec['images_total'] - 1}")
    _wait(client, render["id"], args)
    out = Path(args.out or f"stylised-{scene.stem}")
    if not _confirm(args, f"render job {render['id']} is rendered (previews: {client.url}/jobs/{render['id']}). "
                          "Approve it (pays its workers) and go on?"):
        _say(args, f"stopped: approve the render with `farm approve {render['id']}` (after looking at "
                   f"{client.url}/jobs/{render['id']}); job {sd['id']} then starts by itself; or run again with "
                   "--approve")
        if args.json:
            print(json.dumps({"render_job": render["id"], "diffusion_job": sd["id"], "files": []}))
        return 3
    client.approve(render["id"])
    _wait(client, sd["id"], args)
    if not _confirm(args, f"job {sd['id']} is done (previews: {client.url}/jobs/{sd['id']}). Approve it and "
                          f"download to {out}?"):
        _say(args, f"stopped: `farm approve {sd['id']}` then `farm results {sd['id']} --out {out}`")
        return 3
    client.approve(sd["id"])
    files = client.download_results(sd["id"], out)
    frames = client.download_results(render["id"], out / "render") if not args.no_frames else []
    _say(args, f"{len(files)} stylised files in {out.resolve()}" + (f", {len(frames)} frames and passes in "
                                                                   f"{(out / 'render').resolve()}" if frames else ""))
    if args.json:
        print(json.dumps({"render_job": render["id"], "diffusion_job": sd["id"], "files": [str(p) for p in files]}))
    return 0


def add_commands(sub: argparse._SubParsersAction, client_cmd) -> None:
    """Add ``stylise`` (a creator command made by ``client_cmd``) to the parser of :mod:`client.cli`."""
    s = client_cmd("stylise", "render a scene with passes and stylise each frame with ControlNets over them, "
                              "fixed seeds (one command: render, approve, diffusion, download)")
    s.add_argument("scene", help="the .blend file")
    s.add_argument("--frames", required=True, help="frames to render, e.g. 1-8")
    s.add_argument("--passes", default=None, help=f"render passes ({','.join(RENDER_PASSES)}; default: those the "
                                                  "--control options take)")
    s.add_argument("--control", action="append", required=True, metavar="PASS[:WEIGHT]",
                   help="a ControlNet named like the pass it takes (or NAME=PASS[:WEIGHT]); repeatable")
    s.add_argument("--model", required=True, help="diffusion model name workers hold, or a local model folder")
    s.add_argument("--prompt", action="append", help="a prompt (several: taken in turn frame by frame)")
    s.add_argument("--prompt-file", default=None, help="a file with one prompt a line")
    s.add_argument("--negative", default="")
    s.add_argument("--seed", type=int, required=True, help="image i (frame i) uses seed+i: fixed, so a re-run "
                                                           "gives the same images")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--size", default=None, help="WIDTHxHEIGHT of the images (default: the frames' size)")
    s.add_argument("--scheduler", default="default")
    s.add_argument("--per-task", type=int, default=1, help="images per task (micro-batch)")
    s.add_argument("--lora", action="append", metavar="NAME[:WEIGHT]", help="a LoRA workers hold; repeatable")
    s.add_argument("--samples", type=int, default=None, help="Cycles samples of the render")
    s.add_argument("--resolution-percent", type=int, default=None, help="render at this percent of the scene's size")
    s.add_argument("--resolution", default=None, help="render at WIDTHxHEIGHT")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--name", default="")
    s.add_argument("--approve", action="store_true", help="approve the render and the images without asking (pays "
                                                          "the workers); without it a terminal is asked")
    s.add_argument("--out", default=None, help="where to download (default ./stylised-SCENE)")
    s.add_argument("--no-frames", action="store_true", help="download only the stylised images, not the frames")
    s.set_defaults(func=cmd_stylise)
