"""The post-processes of the diffusion runtime: a diffusers upscale pipeline (x4,
``StableDiffusionUpscalePipeline``) from a worker's ``upscalers/`` folder, run on each generated image in the
same task, and the SDXL refiner (``StableDiffusionXLImg2ImgPipeline`` from ``refiners/``), which finishes the
base pipeline's last denoising steps on its latents.

Used only by :mod:`worker.runtimes.diffusion` (inside the sandboxed child, after torch is imported). A
request's upscaler is ``{name, hash, path, steps, noise_level}``; the path comes from the worker's own scan
(:func:`common.model_folders.scan`), never from a job. Invariants:

* the folder is re-checked (:func:`common.model_folders.check_upscaler`, also for refiners) and loaded with
  ``use_safetensors=True, local_files_only=True``: never a pickle, never a download;
* image k is upscaled alone with a fresh ``torch.Generator(device).manual_seed(seed_k)`` (its own seed), the
  image's prompt and negative prompt and the job's guidance, from the PIL image the base pipeline returned, so the result
  equals the upscale pipeline called directly on that base image with that seed (tested within 1/255);
* the refiner takes the base pipeline's latents (``output_type="latent"``, ``denoising_end=switch``) and runs
  from ``denoising_start=switch`` with a fresh generator per image seeded with the image's seed, as the
  diffusers SDXL base + refiner recipe does (tested against it called directly);
* each call gets a fresh copy of the upscaler's saved scheduler (no sampler state leaks between tasks);
  at most :data:`MAX_UPSCALERS` stay loaded, least recently used dropped first, and their bytes count in the
  runtime's cache budget through the returned size.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from common.model_folders import check_upscaler

MAX_UPSCALERS = 2
"""Upscale pipelines kept loaded in one runtime (the x4 upscaler is about 2 GB in float16)."""
MAX_SIDE = 4096
"""Largest upscaled side (the coordinator refuses bigger at submit where it knows the size)."""
DEFAULT_NOISE_LEVEL = 20
"""Noise added to the low-resolution image (diffusers' default for the x4 upscaler)."""


class UpscaleError(Exception):
    """The upscaler cannot run; ``retryable`` when the fault is this worker's (its folder), not the job's."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class Upscalers:
    """Loaded upscale pipelines of one runtime, by hash (LRU)."""

    def __init__(self, diffusers, torch, device: str, dtype, dtype_arg: dict):
        self.diffusers, self.torch, self.device, self.dtype_arg = diffusers, torch, device, dtype_arg
        self.loaded: OrderedDict[str, tuple[object, dict, int]] = OrderedDict()  # hash → (pipe, scheduler, bytes)

    def bytes(self) -> int:
        return sum(size for _p, _s, size in self.loaded.values())

    def _get(self, up: dict, kind: str = "upscaler"):
        key = str(up["hash"])
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        path = Path(up["path"])
        problem = check_upscaler(path, kind)
        if problem:
            raise UpscaleError(f"{kind} {up.get('name')!r} cannot be used on this worker: {problem}", True)
        while len(self.loaded) >= MAX_UPSCALERS:
            self.loaded.popitem(last=False)
        cls = json.loads((path / "model_index.json").read_text())["_class_name"]
        try:
            pipe = getattr(self.diffusers, cls).from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                                **self.dtype_arg).to(self.device)
        except Exception as e:
            raise UpscaleError(f"cannot load {kind} {up.get('name')!r} from {path}: {type(e).__name__}: "
                               f"{str(e)[:300]}", True) from None
        pipe.set_progress_bar_config(disable=True)
        size = sum(p.numel() * p.element_size() for m in pipe.components.values()
                   if isinstance(m, self.torch.nn.Module) for p in m.parameters())
        self.loaded[key] = (pipe, dict(pipe.scheduler.config), size)
        return self.loaded[key]

    def run(self, up: dict, images: list[dict], results: list) -> list:
        """``results`` (PIL images, one per request image) upscaled, in order."""
        pipe, sched, _size = self._get(up)
        steps, noise = int(up.get("steps") or 20), int(up.get("noise_level", DEFAULT_NOISE_LEVEL))
        if not 0 <= noise <= int(getattr(pipe.config, "max_noise_level", 350)):
            raise UpscaleError(f"upscaler noise level {noise} is over {pipe.config.max_noise_level}: lower it", False)
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if max(max(img.size) for img in results) * scale > MAX_SIDE:
            raise UpscaleError(f"images of {results[0].width}x{results[0].height} upscaled x{scale} are over "
                               f"{MAX_SIDE} pixels a side: generate smaller images", False)
        tok = pipe.tokenizer
        out = []
        for im, img in zip(images, results):
            for field in ("prompt", "negative"):
                n = len(tok(im.get(field) or "").input_ids)
                if n > tok.model_max_length:
                    raise UpscaleError(f"{field} of image {im['index']} is {n} tokens, over upscaler "
                                       f"{up.get('name')!r}'s limit of {tok.model_max_length}: shorten it", False)
            pipe.scheduler = type(pipe.scheduler).from_config(sched)
            gen = self.torch.Generator(device=self.device).manual_seed(int(im["seed"]))
            with self.torch.inference_mode():
                out.append(pipe(prompt=im["prompt"], image=img, num_inference_steps=steps,
                                guidance_scale=float(up.get("guidance", 7.5)), noise_level=noise,
                                generator=gen, **({"negative_prompt": im["negative"]} if im.get("negative") else {}),
                                ).images[0])
        return out

    def refine(self, ref: dict, images: list[dict], latents, steps: int, guidance: float) -> list:
        """PIL images of the refiner ``ref`` (``{name, hash, path, switch}``) finishing ``latents``."""
        pipe, sched, _size = self._get(ref, "refiner")
        pipe.scheduler = type(pipe.scheduler).from_config(sched)
        negatives = [im.get("negative") or "" for im in images]
        gens = [self.torch.Generator(device=self.device).manual_seed(int(im["seed"])) for im in images]
        with self.torch.inference_mode():
            return pipe(prompt=[im["prompt"] for im in images], image=latents, num_inference_steps=steps,
                        denoising_start=float(ref["switch"]), guidance_scale=guidance, generator=gens,
                        output_type="pil", **({"negative_prompt": negatives} if any(negatives) else {})).images
