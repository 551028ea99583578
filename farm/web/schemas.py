"""Request bodies of the creator plane's JSON API: each field bounded, each described for the OpenAPI page.

Ranges that depend on the kind of job are checked by its planner (:mod:`farm.kinds`), whose errors say
what to change; these models only keep malformed or oversized requests out.
"""
from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    """Every error answer. Routes explain in a sentence what went wrong and what to do; FastAPI's own
    request validation lists the bad fields. (Documented for 422, which carries both.)"""
    detail: str | list[dict[str, Any]]


class MissingRequest(BaseModel):
    hashes: list[str] = Field(max_length=10000)


class WorkerKeyRequest(BaseModel):
    worker: str = Field(min_length=1, max_length=100, description="a worker's public key (Z85, 40 characters) "
                        "or, to revoke, a worker id (its key is looked up)")


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    credit_line: bool = False  # its jobs are leased before their deposit is confirmed (the operator trusts it)


class CreditLine(BaseModel):
    credit_line: bool


class JobCreate(BaseModel):
    scene_sha256: str = Field("", description="the .blend's blob (with a project: may be left out)")
    project: dict[str, Any] | None = Field(None, description="a project manifest {scene, files: [{path, sha256}]}: "
                                           "paths relative to the project root (common/manifest.py); every "
                                           "file uploaded first")
    missing: list[dict[str, str]] | None = Field(None, max_length=10000, description="files the scene reads that "
                                                 "were missing at submit (--allow-missing): shown on the job")
    frames: str = Field(min_length=1, max_length=2000)
    chunk: int = Field(1, ge=1, le=10000)
    format: str = "PNG"
    color_depth: str | None = None
    samples: int | None = None
    resolution_percent: int | None = None
    resolution: list[int] | None = Field(None, min_length=2, max_length=2,
                                         description="output [width, height] in pixels (percentage then 100)")
    tiles: str | None = Field(None, max_length=10, description="COLSxROWS tiles per frame, 1x1 to 16x16, "
                              "each frame stitched exactly from its tiles")
    overscan: int | None = Field(None, ge=0, le=256, description="tile margin in pixels (default: from the "
                                 "scene: 16 with denoising, 4-16 with adaptive sampling, else 0)")
    video: bool = Field(False, description="also encode the frames to video.mp4 (H.264, the scene's fps)")
    passes: list[str] | str | None = Field(None, description="render passes written next to each frame: depth, "
                                           "normal, mask (PNG, normalised as ControlNet conditions)")
    time_limit: int | None = Field(None, ge=1, le=7 * 86400, description="seconds one frame may take on a "
                                   "worker; its sandbox stops a task that runs longer (default: the worker's)")
    priority: int = Field(0, ge=-100, le=100)
    min_tier: Literal["", "new", "trusted", "top"] = Field("", description="only workers of this reputation "
                                                           "tier or better render it (farm workers shows tiers)")
    tier: Literal["", "any", "trusted", "top"] = Field("", description="the priced tier: any worker (1x), "
                                                       "trusted (1.5x) or top (2x) of the market price; sets min_tier")
    max_price: str | float | None = Field(None, description="refuse (409) if the job's rate, in tokens per unit "
                                          "(market price x tier multiplier), is above this")
    name: str = Field("", max_length=200)
    scene_name: str = Field("", max_length=200)
    client_key: str = Field("", max_length=100, description="idempotency key: a retried submit returns the same job")


class LoraRef(BaseModel):
    """A LoRA of a diffusion job, by the name workers advertise (and optionally its file's sha256)."""
    name: str = Field(min_length=1, max_length=300)
    weight: float = Field(1.0, ge=-4, le=4)
    hash: str = Field("", max_length=64, description="pin this version (sha256 of the .safetensors file)")


class ControlRef(BaseModel):
    """A ControlNet of a diffusion job: the name workers advertise, its conditioning scale and control image."""
    name: str = Field(min_length=1, max_length=300)
    weight: float = Field(1.0, ge=0, le=4)
    image: str = Field("", max_length=64, description="sha256 of the uploaded control image (PNG)")
    hash: str = Field("", max_length=64, description="pin this version (sha256 of the ControlNet folder)")
    render_pass: str = Field("", max_length=20, description="control_from_job: the render pass it takes "
                             "(default: its name)")


class EmbeddingRef(BaseModel):
    """A textual-inversion embedding of a diffusion job: the name workers advertise and the prompt token."""
    name: str = Field(min_length=1, max_length=300)
    token: str = Field("", max_length=64, description="the word of the prompt it stands for (default: its name)")
    hash: str = Field("", max_length=64, description="pin this version (sha256 of the .safetensors file)")


class UpscaleRef(BaseModel):
    """The upscaler post-process of a diffusion job (an upscale pipeline workers hold in upscalers/)."""
    name: str = Field(min_length=1, max_length=300)
    steps: int | None = Field(None, description="its denoising steps (default: the job's)")
    noise_level: int = Field(20, ge=0, le=350, description="noise added to the image before upscaling")
    hash: str = Field("", max_length=64, description="pin this version (sha256 of the upscaler folder)")


class RefinerRef(BaseModel):
    """The SDXL refiner of a diffusion job (a refiner pipeline workers hold in refiners/)."""
    name: str = Field(min_length=1, max_length=300)
    switch: float = Field(0.8, gt=0, lt=1, description="share of the steps the base model runs, the refiner the rest")
    hash: str = Field("", max_length=64, description="pin this version (sha256 of the refiner folder)")


class DiffusionJobCreate(BaseModel):
    """A Stable Diffusion batch. Ranges are checked by farm.kinds.diffusion, whose errors say what to change."""
    model: str = Field(min_length=1, max_length=300, description="model name or hub id that workers advertise")
    model_hash: str = Field("", max_length=64, description="pin this version (sha256 of the model folder)")
    prompts: list[str] = Field(min_length=1, max_length=1000)
    negative: str = Field("", max_length=2000)
    count: int = Field(1, description="images per prompt (txt2img)")
    seed: int | None = Field(None, description="base seed: image k uses seed + k (default: random, recorded)")
    steps: int = 30
    guidance: float = 7.5
    width: int | None = Field(None, description="multiple of 8 (default 512; img2img: the source frames')")
    height: int | None = None
    scheduler: str = "default"
    per_task: int = Field(1, description="images per task (micro-batch)")
    init_from_job: int | None = Field(None, description="img2img: frame i of this job becomes image i")
    strength: float | None = Field(None, description="img2img (default 0.5) and inpainting (default 1): how far "
                                   "from the starting image, (0, 1]")
    control_from_job: int | None = Field(None, description="ControlNets take the render passes of this job's "
                                         "frames: image i from frame i")
    init_image: str = Field("", max_length=64, description="inpainting: sha256 of the uploaded PNG to paint into")
    mask: str = Field("", max_length=64, description="inpainting: sha256 of the uploaded PNG mask (white: repaint, "
                      "black: keep), the image's size")
    loras: list[LoraRef] = Field([], max_length=8, description="LoRAs workers hold (their loras/ folders), "
                                 "stacked with these weights")
    controls: list[ControlRef] = Field([], max_length=4, description="ControlNets workers hold (their controlnets/ "
                                       "folders), each with its control image, combined")
    embeddings: list[EmbeddingRef] = Field([], max_length=8, description="textual-inversion embeddings workers "
                                           "hold (their embeddings/ folders), each written in prompts as its token")
    upscale: UpscaleRef | None = Field(None, description="upscale each image after generation (x4)")
    refiner: RefinerRef | None = Field(None, description="SDXL: the refiner finishes each image's last steps")
    mask_from_job: int | None = Field(None, description="inpainting over this job's frames, each with its mask "
                                      "pass: image i from frame i")
    priority: int = Field(0, ge=-100, le=100)
    min_tier: Literal["", "new", "trusted", "top"] = Field("", description="only workers of this reputation "
                                                           "tier or better render it (farm workers shows tiers)")
    tier: Literal["", "any", "trusted", "top"] = Field("", description="the priced tier: any worker (1x), "
                                                       "trusted (1.5x) or top (2x) of the market price; sets min_tier")
    max_price: str | float | None = Field(None, description="refuse (409) if the job's rate, in tokens per unit "
                                          "(market price x tier multiplier), is above this")
    name: str = Field("", max_length=200)
    client_key: str = Field("", max_length=100, description="idempotency key: a retried submit returns the same job")
