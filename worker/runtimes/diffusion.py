"""Long-lived Stable Diffusion child process of the worker daemon.

Responsibility: keep diffusers pipelines loaded across tasks and generate images with recorded seeds,
driven by JSON-line requests from the parent (:class:`worker.runtimes.process.RuntimeProcess`). With
:mod:`worker.runtimes.tiny_pipeline` this is the only worker module that imports torch; the daemon never does.

    python -m worker.runtimes.diffusion [--gpus all|none|0,1]

Protocol (one JSON object per line; replies on the original stdout):
    <- {"event":"ready","pid","device","dtype","gpu","devices","torch","diffusers"}   once, at start
    -> {"op":"ping","id":N}                  <- {"event":"pong","id":N}
    -> {"op":"quit"}                         the process exits 0 (so does EOF on stdin)
    -> {"op":"generate","id":N,"model_path":ABS,"model_name","model_hash","mode":"txt2img"|"img2img"|"inpaint",
        "steps","guidance","width","height","scheduler","strength","out_dir":ABS,
        "loras":[{"name","hash","weight","path":ABS}..], "controls":[{"name","hash","weight","path","image"}..],
        "embeddings":[{"name","hash","token","path":ABS}..], "upscale":{"name","hash","path","steps","noise_level"}|null,
        "refiner":{"name","hash","path","switch"}|null,
        "images":[{"name","index","seed","prompt","negative","init":ABS|null,"mask":ABS|null,"control_images":[ABS..],
                   "source":{...}}..]}
       <- {"event":"image","id":N,"name","path","index","seconds"}   after each image
       <- {"event":"done","id":N,"outputs":[{"name","path","index","seconds"}..],
           "loaded":bool,"load_seconds","cached":[hash..],"rss_bytes"}
       <- {"event":"error","id":N|null,"message":str,"retryable":bool}  instead of done

Invariants:
- Nothing but protocol lines reach the protocol fd: fd 1 is pointed at stderr before torch is imported.
- Models load only from a local folder (``local_files_only=True``, HF_HUB_OFFLINE=1): never a download.
- Image k of a request uses ``torch.Generator(device).manual_seed(seed_k)``, one generator per image, so
  an image depends on its own seed and the settings, not on which other images share its micro-batch
  (up to float rounding of the batched math: at most 1/255 per channel in 8-bit on CPU, measured).
  Same seed, settings, model hash, device type and micro-batch grouping give the same pixels.
- Each request starts from a fresh scheduler built from the model's saved config, so no sampler state
  leaks from one task into the next.
- SD 1.x/2.x and SDXL folders (:data:`PIPELINES`, by the class model_index.json names). Pipelines are
  cached per model hash, least recently used evicted first, within DIFFUSION_CACHE_BYTES; the one in use
  is always kept. CUDA with float16 when available, else the CPU in float32.
- Faults of the request (prompt over the token limit, bad size, unknown scheduler) give retryable=false;
  faults of this worker (model folder missing or unreadable here, out of memory) give retryable=true.
- LoRAs (:mod:`worker.runtimes.adapters`) are loaded once per pipeline and LoRA hash and set per request;
  a request without LoRAs runs with them disabled. Textual-inversion embeddings are loaded for one request
  and unloaded after it (the cached pipeline is dropped when that cannot be verified). ControlNets combine
  with text-to-image, img2img and inpainting (diffusers' ControlNet, ControlNet img2img and inpaint pipelines).
- An upscaler (:mod:`worker.runtimes.upscale`) runs on each generated image after generation, in the same
  request; the PNG is the upscaled image and its metadata names the upscaler and its hash. An SDXL refiner
  finishes the base's denoising from ``switch`` on (before any upscaler).
- PNGs carry their generation parameters as text chunks (LoRA names, hashes and weights too) and no
  dates, so the same image has the same bytes (and blob hash) on every worker that produces it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path

from common.limits import DIFFUSION_SCHEDULERS
from common.model_folders import BUILD_HINT, check, family
from worker.runtimes.adapters import AdapterError, apply_loras, controlnets, load_embeddings, unload_embeddings
from worker.runtimes.upscale import UpscaleError, Upscalers
from worker.settings import DIFFUSION_CACHE_BYTES, DIFFUSION_THREADS

PIPELINES = {  # family → diffusers class per mode; the modes share the loaded text-to-image pipeline's modules
    "sd": {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
           "inpaint": "StableDiffusionInpaintPipeline", "control": "StableDiffusionControlNetPipeline",
           "control_img2img": "StableDiffusionControlNetImg2ImgPipeline",
           "control_inpaint": "StableDiffusionControlNetInpaintPipeline"},
    "sdxl": {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline", "control": "StableDiffusionXLControlNetPipeline",
             "control_img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
             "control_inpaint": "StableDiffusionXLControlNetInpaintPipeline"},
}

torch = None  # imported in main(), after the protocol fd is set aside
diffusers = None


class RequestError(Exception):
    """The request is at fault: every worker would fail the same way."""


class WorkerFault(Exception):
    """This worker cannot do it (its copy of the model, its memory): another worker may."""


def pick_device(gpus: str) -> str:
    if gpus == "none" or not torch.cuda.is_available():
        return "cpu"
    if gpus == "all":
        return "cuda"
    return f"cuda:{int(gpus.split(',')[0])}"


class Runtime:
    def __init__(self, proto, gpus: str):
        self.proto = proto
        self.device = pick_device(gpus)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.cache: OrderedDict[str, dict] = OrderedDict()  # model hash → {"pipe", "img2img", "bytes", ...}
        self.budget = DIFFUSION_CACHE_BYTES or self._default_budget()
        self.upscalers = Upscalers(diffusers, torch, self.device, self.dtype, _dtype_arg(self.dtype))

    def _default_budget(self) -> int:
        if self.device.startswith("cuda"):
            return int(torch.cuda.get_device_properties(torch.device(self.device)).total_memory * 0.7)
        try:
            return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.4)
        except (ValueError, OSError):
            return 8 << 30

    # ---- plumbing -------------------------------------------------------
    def emit(self, **event) -> None:
        self.proto.write(json.dumps(event) + "\n")
        self.proto.flush()

    def serve(self, stdin) -> int:
        devices = ([{"type": "CUDA", "name": torch.cuda.get_device_name(torch.device(self.device)),
                     "id": self.device}] if self.device.startswith("cuda") else [{"type": "CPU", "id": "cpu"}])
        self.emit(event="ready", pid=os.getpid(), device=self.device, dtype=str(self.dtype).split(".")[-1],
                  gpu=self.device != "cpu", devices=devices, torch=torch.__version__,
                  diffusers=diffusers.__version__)
        while True:
            line = stdin.readline()
            if not line:
                return 0
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except ValueError as e:
                self.emit(event="error", id=None, message=f"malformed request line: {e}", retryable=False)
                continue
            rid = req.get("id") if isinstance(req, dict) else None
            try:
                if not isinstance(req, dict):
                    raise RequestError("request must be a JSON object")
                op = req.get("op")
                if op == "quit":
                    return 0
                if op == "ping":
                    self.emit(event="pong", id=rid)
                elif op == "generate":
                    self.generate(rid, req)
                else:
                    raise RequestError(f"unknown op {op!r}")
            except RequestError as e:
                self.emit(event="error", id=rid, message=str(e), retryable=False)
            except WorkerFault as e:
                self.emit(event="error", id=rid, message=str(e), retryable=True)
            except Exception as e:  # a bug or an out-of-memory: not the request's fault
                traceback.print_exc()
                if "out of memory" in str(e).lower():  # start over: the retry reloads what it needs
                    for key in list(self.cache):
                        self._drop(key)
                    self.upscalers.loaded.clear()
                self.emit(event="error", id=rid, retryable=True,
                          message=f"internal error in the diffusion runtime: {type(e).__name__}: {e}")

    # ---- pipelines ------------------------------------------------------
    def pipeline(self, req: dict) -> tuple[dict, bool, float]:
        """The cached entry of the request's model, loading it (and evicting others) if needed."""
        key = req["model_hash"]
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], False, 0.0
        path = Path(req["model_path"])
        problem = check(path)
        if problem:
            raise WorkerFault(f"model {req.get('model_name')!r} cannot be used on this worker: {problem}")
        estimate = sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".bin"))
        self._evict(keep=None, need=estimate)
        t0 = time.perf_counter()
        try:
            kind = family(path)
            pipe = getattr(diffusers, PIPELINES[kind]["txt2img"]).from_pretrained(
                str(path), local_files_only=True, use_safetensors=True,  # never unpickle: it runs code
                variant=_variant(path), **_dtype_arg(self.dtype))
            pipe = pipe.to(self.device)
        except Exception as e:
            traceback.print_exc()
            raise WorkerFault(f"cannot load model {req.get('model_name')!r} from {path}: "
                              f"{type(e).__name__}: {str(e)[:500]}; {BUILD_HINT}") from None
        pipe.set_progress_bar_config(disable=True)
        size = sum(p.numel() * p.element_size() for m in pipe.components.values()
                   if isinstance(m, torch.nn.Module) for p in [*m.parameters(), *m.buffers()])
        entry = {"pipe": pipe, "img2img": None, "inpaint": None, "bytes": size,
                 "scheduler": dict(pipe.scheduler.config),
                 "name": req.get("model_name", ""), "family": kind,
                 "scheduler_class": type(pipe.scheduler).__name__}
        self.cache[key] = entry
        self._evict(keep=key)
        return entry, True, time.perf_counter() - t0

    def _load_controlnet(self, path: Path):
        try:
            net = diffusers.ControlNetModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                            **_dtype_arg(self.dtype))
        except Exception as e:
            raise WorkerFault(f"cannot load ControlNet from {path}: {type(e).__name__}: {str(e)[:300]}") from None
        return net.to(self.device).eval()

    def _evict(self, keep: str | None, need: int = 0) -> None:
        """Drop least recently used pipelines (never ``keep``) until they plus ``need`` bytes fit the budget."""
        for key in list(self.cache):
            if sum(e["bytes"] for e in self.cache.values()) + self.upscalers.bytes() + need <= self.budget:
                break
            if key != keep:
                self._drop(key)

    def _drop(self, key: str) -> None:
        del self.cache[key]
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _scheduler(self, entry: dict, name: str):
        if name in ("", "default"):
            cls = getattr(diffusers, entry["scheduler_class"])
        elif name in DIFFUSION_SCHEDULERS:
            cls = getattr(diffusers, DIFFUSION_SCHEDULERS[name])
        else:
            raise RequestError(f"unknown scheduler {name!r}: use default or one of {', '.join(DIFFUSION_SCHEDULERS)}")
        return cls.from_config(entry["scheduler"])

    # ---- generation -----------------------------------------------------
    def generate(self, rid, req: dict) -> None:
        images = req.get("images") or []
        if not images:
            raise RequestError("no images requested")
        width, height = req.get("width"), req.get("height")
        for side in (width, height):
            if side is not None and (int(side) % 8 or int(side) < 8):
                raise RequestError(f"image size {width}x{height} is not a multiple of 8")
        entry, loaded, load_seconds = self.pipeline(req)
        try:
            apply_loras(entry, req.get("loras") or [])
            tokens = load_embeddings(entry, req.get("embeddings") or [])
        except AdapterError as e:
            raise (WorkerFault if e.retryable else RequestError)(str(e)) from None
        try:
            self._generate(rid, req, images, entry, loaded, load_seconds)
        finally:  # the job's tokens go with it; a pipeline they may have changed is not kept
            if not unload_embeddings(entry, tokens) and req["model_hash"] in self.cache:
                self._drop(req["model_hash"])

    def _generate(self, rid, req: dict, images: list[dict], entry: dict, loaded: bool, load_seconds: float) -> None:
        width, height = req.get("width"), req.get("height")
        base = entry["pipe"]
        tok = base.tokenizer
        for im in images:
            for field in ("prompt", "negative"):  # as the text encoder sees it: an embedding's token is its vectors
                n = len(tok(base.maybe_convert_prompt(im.get(field) or "", tok)).input_ids)
                if n > tok.model_max_length:
                    raise RequestError(f"{field} of image {im['index']} is {n} tokens, over the model's limit of "
                                       f"{tok.model_max_length}: shorten it")
        mode = req.get("mode") or "txt2img"
        if mode not in ("txt2img", "img2img", "inpaint"):
            raise RequestError(f"unknown mode {mode!r}")
        if base.unet.config.in_channels == 9 and mode != "inpaint":
            raise RequestError(f"model {req.get('model_name')!r} is an inpainting model: give it an image and a "
                               "mask (--image, --mask), or pick a text-to-image model")
        controls = req.get("controls") or []
        if controls:
            try:
                nets, scales = controlnets(entry, controls, self._load_controlnet)
            except AdapterError as e:
                raise (WorkerFault if e.retryable else RequestError)(str(e)) from None
            pipe = self._control_pipe(entry, mode, controls, nets)
        elif mode == "txt2img":
            pipe = base
        else:
            if entry.get(mode) is None:  # same modules, no second copy of the weights
                entry[mode] = getattr(diffusers, PIPELINES[entry["family"]][mode]).from_pipe(base)
                entry[mode].set_progress_bar_config(disable=True)
            pipe = entry[mode]
        pipe.scheduler = self._scheduler(entry, str(req.get("scheduler") or "default"))
        gens = [torch.Generator(device=self.device).manual_seed(int(im["seed"])) for im in images]
        negatives = [im.get("negative") or "" for im in images]
        args = dict(prompt=[im["prompt"] for im in images], generator=gens, num_inference_steps=int(req["steps"]),
                    guidance_scale=float(req["guidance"]), output_type="pil",
                    # none at all is not "": SDXL then uses zeros (force_zeros_for_empty_prompt), as a
                    # direct call without a negative prompt does; SD 1.x encodes "" either way
                    **({"negative_prompt": negatives} if any(negatives) else {}))
        if mode != "txt2img":
            inits = self._init_images(images, width, height)
            width, height = inits[0].size
            args.update(image=inits, strength=float(req["strength"]))
        if controls:  # per image (the render passes of its frame) or one set for the job (uploaded)
            per = [self._control_images(im.get("control_images") or [c["image"] for c in controls], im["index"])
                   for im in images]
            if width is None or height is None:  # the job gave no size: the first pass's, to a multiple of 8
                width, height = (max(8, v // 8 * 8) for v in per[0][0].size)
            if all(not im.get("control_images") for im in images):  # one set for the whole batch: broadcast
                image = per[0][0] if len(controls) == 1 else per[0]
            else:  # one control image per image: a list; several ControlNets: [image][control] (diffusers 0.42)
                image = [p[0] for p in per] if len(controls) == 1 else per
            args.update(**{"image" if mode == "txt2img" else "control_image": image},  # img2img/inpaint: the init
                        controlnet_conditioning_scale=scales[0] if len(controls) == 1 else scales)
        if mode == "inpaint":
            args.update(mask_image=self._init_images(images, width, height, key="mask", what="mask"),
                        width=int(width), height=int(height))
        elif mode == "txt2img" or controls:
            args.update(width=int(width), height=int(height))
        refiner = req.get("refiner")
        if refiner:
            if entry["family"] != "sdxl" or mode != "txt2img" or controls:
                raise RequestError("the SDXL refiner follows text-to-image on an SDXL model only: leave out --refiner "
                                   "or pick an SDXL model (without --image, --init-from-job or --control)")
            args.update(output_type="latent", denoising_end=float(refiner["switch"]))
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = pipe(**args).images
        try:
            if refiner:
                result = self.upscalers.refine(refiner, images, result, int(req["steps"]), float(req["guidance"]))
            if req.get("upscale"):
                result = self.upscalers.run({**req["upscale"], "guidance": req["guidance"]}, images, result)
        except UpscaleError as e:
            raise (WorkerFault if e.retryable else RequestError)(str(e)) from None
        seconds = round((time.perf_counter() - t0) / len(images), 4)
        out_dir = Path(req["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = []
        for im, img in zip(images, result):
            path = out_dir / Path(im["name"]).name
            img.save(path, pnginfo=self._metadata(req, im, type(pipe.scheduler).__name__, width, height, len(images)))
            outputs.append({"name": path.name, "path": str(path), "index": im["index"], "seconds": seconds})
            self.emit(event="image", id=rid, **outputs[-1])
        self.emit(event="done", id=rid, outputs=outputs, loaded=loaded, load_seconds=round(load_seconds, 4),
                  cached=list(self.cache), rss_bytes=_rss_bytes())

    @staticmethod
    def _control_pipe(entry: dict, mode: str, controls: list[dict], nets: list):
        """The ControlNet pipeline of ``mode`` over ``nets`` on the cached model: built by ``from_pipe`` (the
        same modules, ~30 ms on CPU) once and kept while the next request asks for the same kind and the same
        loaded ControlNet objects (one kept a model; dropped with the model, or by adapters when it evicts one
        of its nets)."""
        kind = "control" if mode == "txt2img" else f"control_{mode}"
        key = (kind, tuple(str(c["hash"]) for c in controls))
        cached = entry.get("control_pipe")
        if cached and cached["key"] == key and len(cached["nets"]) == len(nets) \
                and all(a is b for a, b in zip(cached["nets"], nets)):
            return cached["pipe"]
        entry.pop("control_pipe", None)
        net = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
        pipe = getattr(diffusers, PIPELINES[entry["family"]][kind]).from_pipe(entry["pipe"], controlnet=net)
        pipe.set_progress_bar_config(disable=True)
        entry["control_pipe"] = {"key": key, "nets": list(nets), "pipe": pipe}
        return pipe

    def _control_images(self, paths: list[str], index: int) -> list:
        """The control images of one image, as RGB (the pipeline fits them to the image size)."""
        return self._init_images([{"init": p, "index": index} for p in paths], None, None,
                                 what="control image", resize=False)

    def _init_images(self, images: list[dict], width, height, key: str = "init", what: str = "init image",
                     resize: bool = True) -> list:
        from PIL import Image
        inits = []
        for im in images:
            try:
                with Image.open(im[key]) as src:
                    img = src.convert("L" if key == "mask" else "RGB")
            except (OSError, KeyError, TypeError) as e:
                raise RequestError(f"{what} of image {im['index']} cannot be read: {e}") from None
            if not resize:  # the pipeline fits it to the image size itself
                inits.append(img)
                continue
            if width is None or height is None:  # the job gave no size: the first frame's, to a multiple of 8
                width, height = (max(8, img.width // 8 * 8), max(8, img.height // 8 * 8))
            if img.size != (int(width), int(height)):
                img = img.resize((int(width), int(height)), Image.LANCZOS)
            inits.append(img)
        return inits

    def _metadata(self, req: dict, im: dict, scheduler: str, width, height, batch: int):
        from PIL.PngImagePlugin import PngInfo
        meta = {"prompt": im["prompt"], "negative_prompt": im.get("negative") or "", "seed": im["seed"],
                "steps": req["steps"], "guidance": req["guidance"], "scheduler": scheduler,
                "model": req.get("model_name", ""), "model_hash": req["model_hash"], "width": width,
                "height": height, "mode": req.get("mode", "txt2img"), "index": im["index"], "micro_batch": batch,
                "device": self.device.split(":")[0], "dtype": str(self.dtype).split(".")[-1]}
        if req.get("loras"):
            meta["loras"] = [{k: lo[k] for k in ("name", "hash", "weight")} for lo in req["loras"]]
        if req.get("embeddings"):
            meta["embeddings"] = [{k: e[k] for k in ("name", "hash", "token")} for e in req["embeddings"]]
        if req.get("upscale"):
            meta["upscaler"], meta["upscaler_hash"] = req["upscale"]["name"], req["upscale"]["hash"]
            meta["upscale"] = {k: req["upscale"][k] for k in ("name", "hash", "steps", "noise_level", "scale")
                               if k in req["upscale"]}
        if req.get("refiner"):
            meta["refiner"] = {k: req["refiner"][k] for k in ("name", "hash", "switch")}
        if req.get("controls"):
            meta["controls"] = [{k: c[k] for k in ("name", "hash", "weight", "image_sha256", "pass") if k in c}
                                for c in req["controls"]]
        if req.get("mode") in ("img2img", "inpaint"):
            meta["strength"] = req["strength"]
        for k, v in (im.get("source") or {}).items():  # where the image started from (frame, passes, mask)
            meta[f"source_{k}"] = v
        info = PngInfo()
        for k, v in meta.items():
            info.add_text(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
        info.add_text("renderhive", json.dumps(meta, sort_keys=True))
        return info


def _dtype_arg(dtype) -> dict:
    """``dtype=`` where diffusers takes it (it deprecated ``torch_dtype=``), else ``torch_dtype=``."""
    from diffusers.utils import deprecation_utils
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _variant(path: Path) -> str | None:
    """"fp16" for a folder that holds only fp16 weight files (a hub download of that variant), else None."""
    unet = [f.name for f in (path / "unet").glob("diffusion_pytorch_model*")]
    plain = [n for n in unet if n.split(".")[1] in ("safetensors", "bin")]
    return "fp16" if not plain and any(".fp16." in n for n in unet) else None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.runtimes.diffusion")
    ap.add_argument("--gpus", default="all", help="all | none | comma-separated GPU indices (the first is used)")
    args = ap.parse_args(argv)
    if args.gpus not in {"all", "none"} and not all(p.isdigit() for p in args.gpus.split(",")):
        ap.error("--gpus must be all, none or indices like 0,1")
    # no downloads, ever: models come from local folders or the local hub cache only
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                      DIFFUSERS_VERBOSITY=os.environ.get("DIFFUSERS_VERBOSITY", "error"),
                      TRANSFORMERS_VERBOSITY=os.environ.get("TRANSFORMERS_VERBOSITY", "error"))
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # from here on, prints of torch/diffusers go to stderr, not into the protocol
    global torch, diffusers
    import diffusers as _diffusers
    import torch as _torch
    torch, diffusers = _torch, _diffusers
    if DIFFUSION_THREADS:
        torch.set_num_threads(DIFFUSION_THREADS)
    return Runtime(proto, args.gpus).serve(sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
