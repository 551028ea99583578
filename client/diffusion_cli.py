"""Stable Diffusion from the creator's side: ``farm submit-diffusion``, ``farm models``, and the diffusion
steps of ``make demo``.

The commands are registered into the parser of :mod:`client.cli` by :func:`add_commands`. ``--model`` takes a model name
that workers advertise (a model folder's name, or a hub id like ``org/name``) or the path of a local model
folder: then the folder is checked here (a corrupt folder is refused before anything is sent) and the job
pins that folder's hash, so it runs only on workers holding exactly those weights.

The demo (:func:`demo_build_model` before the workers start, :func:`demo_run` after the render job) uses
the same API calls; the tiny pipeline (random weights, :mod:`worker.runtimes.tiny_pipeline`) stands in for a real
model, so its images are coloured noise, but seeds, metadata, micro-batches, contact sheets and the job
dependency are the real thing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from client import payments_cli
from client.api import ApiError, Client, parse_wxh


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    return parse_wxh(text, "--size", "512x512") or (None, None)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ApiError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from None
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ApiError('give a prompt: --prompt "…" (repeatable) or --prompt-file FILE (one prompt a line)')
    return prompts


def model_ref(model: str) -> tuple[str, str]:
    """(name, hash) for ``--model``: a local folder is checked and hashed, anything else is a name."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model, ""
    from common import model_folders
    problem = model_folders.check(path)
    if problem:
        raise ApiError(problem)
    path = path.resolve()
    name = path.name
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):  # hub snapshot
        name = path.parent.parent.name[len("models--"):].replace("--", "/")
    return name, model_folders.folder_hash(path)


def parse_loras(values: list[str] | None) -> list[dict[str, Any]]:
    """``--lora NAME[:WEIGHT]`` (repeatable; NAME may pin a hash as NAME@SHA256) → the API's ``loras``."""
    out = []
    for text in values or []:
        name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
        name, _, digest = name.partition("@")
        try:
            out.append({"name": name.strip(), "weight": float(weight), **({"hash": digest} if digest else {})})
        except ValueError:
            raise ApiError(f"--lora {text!r}: give NAME or NAME:WEIGHT, e.g. --lora ink:0.8") from None
    return out


def parse_embeddings(values: list[str] | None) -> list[dict[str, Any]]:
    """``--embedding NAME[:TOKEN]`` (repeatable; NAME may pin a hash as NAME@SHA256) → the API's ``embeddings``."""
    out = []
    for text in values or []:
        name, _, token = text.partition(":")
        name, _, digest = name.partition("@")
        if not name.strip():
            raise ApiError(f"--embedding {text!r}: give NAME or NAME:TOKEN, e.g. --embedding ink:<ink-style>")
        out.append({"name": name.strip(), **({"token": token} if token else {}), **({"hash": digest} if digest else {})})
    return out


def upscale(args) -> dict[str, Any] | None:
    """``--upscale NAME[@SHA256]`` with ``--upscale-steps`` and ``--upscale-noise`` → the API's ``upscale``."""
    if not args.upscale:
        if args.upscale_steps is not None or args.upscale_noise is not None:
            raise ApiError("--upscale-steps and --upscale-noise go with --upscale NAME")
        return None
    name, _, digest = args.upscale.partition("@")
    return {"name": name, **({"hash": digest} if digest else {}),
            **({"steps": args.upscale_steps} if args.upscale_steps is not None else {}),
            **({"noise_level": args.upscale_noise} if args.upscale_noise is not None else {})}


def refiner(text: str | None) -> dict[str, Any] | None:
    """``--refiner NAME[:SWITCH]`` (NAME may pin a hash as NAME@SHA256) → the API's ``refiner``."""
    if not text:
        return None
    name, _, switch = text.partition(":")
    name, _, digest = name.partition("@")
    try:
        return {"name": name, **({"switch": float(switch)} if switch else {}), **({"hash": digest} if digest else {})}
    except ValueError:
        raise ApiError(f"--refiner {text!r}: give NAME or NAME:SWITCH, e.g. --refiner refiner:0.8") from None


def controls(args, client: Client) -> list[dict[str, Any]] | None:
    """``--control NAME[:WEIGHT]`` with ``--control-image FILE`` (in the same order): uploaded, by sha256."""
    names, images = args.control or [], args.control_image or []
    if args.control_from_job is not None:
        if images:
            raise ApiError("with --control-from-job the control images are that job's render passes: leave out "
                           "--control-image")
        return parse_loras(names) or None
    if len(names) != len(images):
        raise ApiError(f"{len(names)} --control but {len(images)} --control-image: give one image after each control")
    out = []
    for ref, path in zip(parse_loras(names), images):
        if not Path(path).is_file():
            raise ApiError(f"cannot read --control-image {path}: give a PNG file")
        out.append({**ref, "image": client.upload_if_missing(Path(path))[0]})
    return out or None


def upload_inpaint(args, client: Client) -> dict[str, str]:
    """``--image F --mask F``: both uploaded (unless the coordinator has them), named by sha256."""
    if not args.mask and not args.image:
        return {}
    if not (args.mask and args.image):
        raise ApiError("inpainting needs both --image FILE (the picture) and --mask FILE (white: repaint, black: keep)")
    out = {}
    for key, path in (("init_image", args.image), ("mask", args.mask)):
        if not Path(path).is_file():
            raise ApiError(f"cannot read {path}: give a PNG file")
        out[key] = client.upload_if_missing(Path(path))[0]
    return out


def cmd_submit_diffusion(args, client: Client) -> int:
    from client.cli import follow_submitted
    prompts = read_prompts(args)
    width, height = parse_size(args.size)
    name, digest = model_ref(args.model)
    body: dict[str, Any] = {
        "model": name, "model_hash": digest, "prompts": prompts, "negative": args.negative, "count": args.count,
        "seed": args.seed, "steps": args.steps, "guidance": args.guidance, "width": width, "height": height,
        "scheduler": args.scheduler, "per_task": args.per_task, "init_from_job": args.init_from_job,
        "strength": args.strength, "priority": args.priority, "min_tier": args.min_tier or "",
        "loras": parse_loras(args.lora) or None, "controls": controls(args, client), **upload_inpaint(args, client),
        "control_from_job": args.control_from_job, "mask_from_job": args.mask_from_job,
        "embeddings": parse_embeddings(args.embedding) or None, "upscale": upscale(args),
        "refiner": refiner(args.refiner),
        "name": args.name, **{k: v for k, v in payments_cli.priced_args(args).items() if v is not None}}
    job = client.submit_diffusion(**body)
    spec = job["spec"]
    if not args.json:
        what = (f"inpainting the frames of job {spec['mask_from_job']} in their mask pass" if spec.get("mask_from_job")
                else f"ControlNets over the render passes of job {spec['control_from_job']}" if spec.get("control_from_job")
                else f"img2img over the frames of job {spec['init_from_job']}" if spec.get("init_from_job")
                else f"{len(spec['prompts'])} prompt(s) × {spec['count']}"
                + (", inpainting the uploaded image" if spec.get("mode") == "inpaint" else ""))
        loras = "".join(f" + LoRA {lo['name']} ({lo['hash'][:12]}) x{lo['weight']:g}" for lo in spec.get("loras") or [])
        loras += "".join(f" + ControlNet {c['name']} ({c['hash'][:12]}) x{c['weight']:g}" for c in spec.get("controls") or [])
        loras += "".join(f" + embedding {e['name']} ({e['hash'][:12]}) as {e['token']}" for e in spec.get("embeddings") or [])
        if spec.get("refiner"):
            loras += f", refined by {spec['refiner']['name']} ({spec['refiner']['hash'][:12]}) from {spec['refiner']['switch']:g}"
        if spec.get("upscale"):
            loras += f", upscaled x{spec['upscale']['scale']} by {spec['upscale']['name']} ({spec['upscale']['hash'][:12]})"
        print(f"job {job['id']} {job['status']}: {spec['images_total']} images ({what}) of {spec['model']} "
              f"({spec['model_hash'][:12]}){loras}, seeds {spec['seed']}-{spec['seed'] + spec['images_total'] - 1}, "
              f"{job['tasks']['total'] - 1} tasks + a contact sheet")
    return follow_submitted(args, client, job)


def cmd_models(args) -> int:
    from common import model_folders
    if args.action == "tiny":
        from worker.runtimes.tiny_pipeline import build
        if not args.out:
            print("error: farm models tiny needs --out DIR (the model folder to write)", file=sys.stderr)
            return 2
        if args.xl:
            from worker.runtimes.tiny_pipeline import build_xl
            path = build_xl(Path(args.out))
        else:
            path = build(Path(args.out), inpaint=args.inpaint)
        print(f"tiny Stable Diffusion {'XL ' if args.xl else 'inpainting ' if args.inpaint else ''}pipeline ({model_folders.folder_hash(path)[:12]}) written to {path.resolve()}; "
              f"serve it with: farm worker --models {path.resolve().parent}")
        return 0
    if args.action == "tiny-lora":
        from worker.runtimes.tiny_pipeline import build_lora
        if not args.out or not args.model or not str(args.out).endswith(".safetensors"):
            print("error: farm models tiny-lora needs --model DIR (a tiny model folder) and --out "
                  "MODELS/loras/NAME.safetensors", file=sys.stderr)
            return 2
        path = build_lora(Path(args.model), Path(args.out), seed=args.seed)
        print(f"tiny LoRA ({model_folders.HashCache(None).file_sha256(path)[:12]}) written to {path.resolve()}; workers serving "
              f"--models {path.resolve().parent.parent} hold it as {path.stem!r}")
        return 0
    if args.action in ("tiny-upscaler", "tiny-refiner", "tiny-embedding"):
        from worker.runtimes.tiny_pipeline import build_embedding, build_refiner, build_upscaler
        if args.action == "tiny-embedding":
            if not args.out or not str(args.out).endswith(".safetensors"):
                print("error: farm models tiny-embedding needs --out MODELS/embeddings/NAME.safetensors", file=sys.stderr)
                return 2
            path = build_embedding(Path(args.out), seed=args.seed, xl=args.xl)
            digest = model_folders.HashCache(None).file_sha256(path)
        else:
            if not args.out:
                print(f"error: farm models {args.action} needs --out MODELS/{args.action[5:]}s/NAME", file=sys.stderr)
                return 2
            path = (build_upscaler if args.action == "tiny-upscaler" else build_refiner)(Path(args.out))
            digest = model_folders.folder_hash(path)
        print(f"tiny {args.action[5:]} ({digest[:12]}) written to {path.resolve()}; workers serving "
              f"--models {path.resolve().parent.parent} hold it as {(path.stem if path.is_file() else path.name)!r}")
        return 0
    if args.action == "tiny-controlnet":
        from worker.runtimes.tiny_pipeline import build_controlnet
        if not args.out or not args.model:
            print("error: farm models tiny-controlnet needs --model DIR (a tiny model folder) and --out "
                  "MODELS/controlnets/NAME", file=sys.stderr)
            return 2
        path = build_controlnet(Path(args.model), Path(args.out), seed=args.seed)
        print(f"tiny ControlNet ({model_folders.folder_hash(path)[:12]}) written to {path.resolve()}; workers serving "
              f"--models {path.resolve().parent.parent} hold it as {path.name!r}")
        return 0
    models = model_folders.scan(model_folders.configured_dirs(args.models or None))
    if args.json:
        print(json.dumps([{**m.advert(), "path": str(m.path)} for m in models], indent=2))
    else:
        for m in models:
            print(f"{m.name}\t{m.kind}\t{m.hash[:12] if m.ok else 'NOT USABLE'}\t{m.path}"
                  + (f"\t{m.error}" if m.error else ""))
        if not models:
            print("no model folders found (give --models DIR or set RENDERHIVE_MODELS; the hub cache is searched too)",
                  file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction, client_cmd) -> None:
    """Add ``submit-diffusion`` (a creator command made by ``client_cmd``) and ``models`` to the parser."""
    from client.cli import add_follow_args
    sd = client_cmd("submit-diffusion", "submit a Stable Diffusion batch (txt2img, or img2img over a job's frames)")
    sd.add_argument("--model", required=True, help="model name or hub id workers hold, or a local model folder")
    sd.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sd.add_argument("--prompt-file", default=None, help="a file with one prompt a line (# comments)")
    sd.add_argument("--count", type=int, default=1, help="images per prompt")
    sd.add_argument("--negative", default="", help="negative prompt")
    sd.add_argument("--seed", type=int, default=None, help="base seed: image k uses seed+k (default: random)")
    sd.add_argument("--steps", type=int, default=30)
    sd.add_argument("--guidance", type=float, default=7.5)
    sd.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default 512x512; img2img: "
                                                 "the source frames' size)")
    sd.add_argument("--scheduler", default="default", help="default (the model's), pndm, ddim, euler, euler_a, "
                                                           "dpm++, heun, unipc")
    sd.add_argument("--per-task", type=int, default=1, help="images per task (micro-batch)")
    sd.add_argument("--init-from-job", type=int, default=None, help="img2img over this job's frames")
    sd.add_argument("--strength", type=float, default=None, help="img2img (default 0.5) and inpainting (default 1): "
                                                                 "how far from the starting image (0-1]")
    sd.add_argument("--control", action="append", metavar="NAME[:WEIGHT]",
                    help="a ControlNet that workers hold (their controlnets/ folder), weight default 1; repeatable, "
                         "each followed by --control-image")
    sd.add_argument("--control-image", action="append", metavar="FILE", help="the control image (PNG) of the "
                                                                             "--control before it")
    sd.add_argument("--control-from-job", type=int, default=None, metavar="JOB",
                    help="ControlNets take the render passes of this job's frames (render it with --passes): image "
                         "i from frame i; each --control names its pass (depth, normal, mask)")
    sd.add_argument("--image", default=None, help="inpainting: the PNG to paint into (with --mask)")
    sd.add_argument("--mask", default=None, help="inpainting: a PNG mask of the image's size, white where to repaint")
    sd.add_argument("--mask-from-job", type=int, default=None, metavar="JOB",
                    help="inpainting over this job's frames, each repainted where its mask pass is white (render it "
                         "with --passes mask): image i from frame i")
    sd.add_argument("--embedding", action="append", metavar="NAME[:TOKEN]",
                    help="a textual-inversion embedding workers hold (their embeddings/ folder); write TOKEN (default "
                         "NAME) in the prompt; repeatable")
    sd.add_argument("--upscale", default=None, metavar="NAME",
                    help="upscale each image x4 with this upscaler workers hold (their upscalers/ folder)")
    sd.add_argument("--upscale-steps", type=int, default=None, help="the upscaler's steps (default: --steps)")
    sd.add_argument("--upscale-noise", type=int, default=None, help="noise level added before upscaling (default 20)")
    sd.add_argument("--refiner", default=None, metavar="NAME[:SWITCH]",
                    help="SDXL: a refiner workers hold (their refiners/ folder) runs the steps after SWITCH "
                         "(default 0.8 of them)")
    sd.add_argument("--lora", action="append", metavar="NAME[:WEIGHT]",
                    help="apply a LoRA that workers hold (their loras/ folder), weight default 1; repeatable")
    add_follow_args(sd, "images")
    sd.set_defaults(func=cmd_submit_diffusion)

    m = sub.add_parser("models", help="diffusion model folders and LoRAs: build tiny test ones, list local ones")
    m.add_argument("action", choices=["tiny", "tiny-lora", "tiny-controlnet", "tiny-upscaler", "tiny-refiner",
                                       "tiny-embedding", "list"],
                   help="tiny: build the tiny test pipeline; tiny-lora / tiny-controlnet / tiny-embedding: a random "
                        "LoRA / ControlNet / textual inversion for it; tiny-upscaler / tiny-refiner: a tiny x4 upscaler / SDXL "
                        "refiner; list: local models")
    m.add_argument("--out", default=None, help="tiny: the model folder to write (its name is the model's name); "
                                               "tiny-lora: MODELS/loras/NAME.safetensors")
    m.add_argument("--model", default=None, help="tiny-lora: the tiny model folder the LoRA is for")
    m.add_argument("--seed", type=int, default=1, help="tiny-lora: seed of the random weights")
    m.add_argument("--inpaint", action="store_true", help="tiny: an inpainting pipeline (9-channel UNet)")
    m.add_argument("--xl", action="store_true", help="tiny: a Stable Diffusion XL pipeline (two text encoders); "
                                                     "tiny-embedding: one for it (clip_l, clip_g)")
    m.add_argument("--models", action="append", help="list: folders to search (default RENDERHIVE_MODELS)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models, needs_client=False)


# ------------------------------------------------------------------ make demo
DEMO_MODEL = "tiny-sd"
DEMO_PROMPTS = ["a watercolor painting of a lighthouse at dusk", "a red robot in a forest, cinematic lighting"]


def demo_build_model(root: Path, con) -> Path:
    """``farm models tiny --out ROOT/models/tiny-sd``; returns the folder of model folders for --models."""
    from worker.runtimes.tiny_pipeline import build
    with con.status("building the tiny Stable Diffusion model (random weights, ~1 M parameters)"):
        path = build(root / "models" / DEMO_MODEL)
    con.print(f"model: {path} (served by the workers with --models {path.parent})")
    return path.parent


def _demo_finish(con, creator: Client, job: dict, out: Path, what: str) -> bool:
    from client.cli import wait_for_job
    t0 = time.monotonic()
    job = wait_for_job(creator, job["id"], quiet=False)
    if job["status"] != "rendered":
        con.print(f"[red]{what} (job {job['id']}) ended {job['status']}: {job['error']}")
        return False
    creator.approve(job["id"])  # full-resolution files are released on approval
    paths = creator.download_results(job["id"], out)
    images = [p for p in paths if p.name.startswith("image_")]
    per_worker: dict[str, int] = {}
    for o in creator.outputs(job["id"]):
        if o["name"].startswith("image_"):
            per_worker[o["worker_id"]] = per_worker.get(o["worker_id"], 0) + 1
    con.print(f"{what}: {len(images)} images in {time.monotonic() - t0:.1f} s by "
              + ", ".join(f"{k}: {v}" for k, v in sorted(per_worker.items())))
    con.print(f"[bold]images:[/] {out}/{images[0].name} … {images[-1].name}   "
              f"[bold]contact sheet:[/] {out}/contact_sheet.png")
    return True


def demo_run(con, creator: Client, scene_sha: str, root: Path) -> int:
    """A txt2img batch (2 prompts × 2 images, micro-batches of 2), then a 4-frame render job with an
    img2img job chained on it, submitted together: the img2img job waits until the frames exist."""
    con.rule("[bold]Stable Diffusion on the farm")
    batch = creator.submit_diffusion(model=DEMO_MODEL, prompts=DEMO_PROMPTS, count=2, seed=1234, steps=20,
                                     width=128, height=128, per_task=2, name="txt2img demo")
    spec = batch["spec"]
    con.print(f"job {batch['id']}: {spec['images_total']} images of {DEMO_MODEL} ({spec['model_hash'][:12]}), "
              f"seeds {spec['seed']}-{spec['seed'] + spec['images_total'] - 1}, "
              f"{batch['tasks']['total'] - 1} tasks of 2")
    if not _demo_finish(con, creator, batch, root / "diffusion", "txt2img"):
        return 1

    frames = creator.submit(scene_sha256=scene_sha, name="turntable keyframes", frames="1-24x6", chunk=1,
                            resolution_percent=50, samples=16)
    chain = creator.submit_diffusion(model=DEMO_MODEL, prompts=["an oil painting of a turntable, impressionist"],
                                     init_from_job=frames["id"], strength=0.6, seed=99, steps=20,
                                     name=f"img2img over job {frames['id']}")
    con.print(f"job {frames['id']} renders frames 1, 7, 13, 19; job {chain['id']} (img2img) waits for them: "
              f"{chain['tasks'].get('waiting', 0)} tasks waiting until you approve the frames")
    from client.cli import wait_for_job
    if wait_for_job(creator, frames["id"], quiet=False)["status"] != "rendered":
        con.print(f"[red]the frames (job {frames['id']}) did not render")
        return 1
    creator.approve(frames["id"])  # frames feed another job only once paid for (fair exchange)
    con.print(f"approved job {frames['id']}: its frames are released to job {chain['id']}")
    if not _demo_finish(con, creator, chain, root / "img2img", "img2img over the rendered frames"):
        return 1
    con.print("each image's PNG metadata holds its prompt, seed, steps, guidance, scheduler, model and model "
              "hash (img2img: its source job, frame and frame hash): "
              f"python -c \"from PIL import Image; "
              f"print(Image.open('{root}/img2img/image_0000_frame_0001.png').text)\"")
    return 0
