"""Memory booking of diffusion jobs (AI Horde's ``max_power``, OpenCue's memory booking): what device
memory one task of a job needs, what a worker says it has, and whether the one fits the other.

A diffusion job states its need at submit (``memory_need`` in the job's and every image task's spec:
``{"cuda": bytes, "cpu": bytes}``, one figure per device kind because the runtime loads float16 weights on
CUDA and float32 on the CPU). It is computed here, on the coordinator, from the pinned model and pieces:

    b       = bytes a weight: 2 on CUDA (float16), 4 on the CPU (float32)
    weights = (model params + LoRA params + ControlNet params) × b
    px      = (width / 8) × (height / 8)          latent pixels
    n       = images a task (the micro-batch; the runtime makes them in one pipeline call)
    unet    = K_UNET[family] × unet_channels × px × n × 2 × b      (× 2: guidance doubles the batch)
            + Σ ControlNets: K_UNET[family] × their channels × px × n × 2 × b × CONTROLNET_SHARE
    vae     = K_VAE × vae_channels × width × height × n × b       (the decode, after the last step)
    up      = an upscaler (x4, one image at a time, after the decode): its UNet on latents of the image's
              own pixels, K_UNET[sd1] × its channels × width × height × 2 × b, or its VAE decoding the
              4x image, K_VAE × its vae_channels × 16 × width × height × b, whichever is more
    need    = (weights + max(unet, vae, up)) × (1 + MARGIN) + FIXED[device]

with an SDXL refiner's and an upscaler's weights in ``weights`` (the runtime keeps them loaded beside the
base model; textual-inversion embeddings are a few KB and not counted). Denoising, decoding and upscaling
do not overlap, hence the max. The constants are fitted to published peak figures
of diffusers with PyTorch's scaled-dot-product attention (SD 1.5 at 512² in float16 about 3.5 GB, SDXL at
1024² about 11-12 GB without VAE tiling), not measured on this farm's GPUs: ``bench/diffusion.py`` prints
the formula beside the measured peak where a GPU is lent, and a worker that runs out of memory fails the
task (retryable elsewhere) rather than anything being lost.

Sizes (params, family, channels) come from, in order of trust: the coordinator's own copy of the model
(``RENDERHIVE_MODELS`` or its hub cache, matched by name, read by :mod:`common.model_size`); the median
of what the workers that hold the exact hash advertised (one worker lying cannot move a median of three;
a lone liar only misroutes jobs to itself); else nothing: a model whose size nobody knows (workers of an
earlier version advertise none) books no memory, as before this module.

A worker advertises ``capabilities["memory"] = {"device": "cuda"|"cpu", "bytes": N}``: what one task may
use (free VRAM of its GPU split between the slots that share it, or the sandbox's RAM limit on a CPU
worker, capped by ``farm worker --vram-limit``). A worker that advertises nothing is booked as a CPU
worker of :data:`UNADVERTISED_BYTES`: it keeps the small jobs it ran before and gets no GPU-sized one.
Invariants: :func:`fits` is pure and cheap (it runs per task per candidate); a need absent or malformed
fits everywhere; a worker's malformed advert counts as none.
"""
from __future__ import annotations

import statistics
from typing import Any

from sqlmodel import Session, select

from common import model_folders, model_size
from farm.kinds.jobs import JobError
from farm.store.models import Worker

GiB = 1 << 30
BYTES_PER_WEIGHT = {"cuda": 2, "cpu": 4}
"""The runtime's dtype: float16 on CUDA, float32 on the CPU (worker/runtimes/diffusion.py)."""
K_UNET = {"sd1": 230.0, "sd2": 230.0, "sdxl": 150.0}
"""Bytes of UNet activations per (channel of its first block × latent pixel × image × weight byte) at the
peak. SDXL's first block has no attention, so its highest resolution holds less per channel."""
CONTROLNET_SHARE = 0.5
"""A ControlNet is the UNet's encoder half: about half the UNet's activations per channel."""
K_VAE = 20.0
"""Bytes of VAE-decode activations per (channel of its first block × output pixel × image × weight byte)."""
MARGIN = 0.25
"""Safety margin over the estimate: allocator fragmentation, cuDNN/cuBLAS workspaces, the estimate's error."""
FIXED = {"cuda": 768 << 20, "cpu": 3 * GiB // 2}
"""Memory a diffusion runtime takes before any model: the CUDA context and libraries (CUDA), or torch and
diffusers' own heap within the sandbox's data limit (CPU)."""
UNADVERTISED_BYTES = 4 * GiB
"""The budget of a worker that advertises no memory (an earlier version): booked as a CPU worker of 4 GiB."""
DEFAULTS = {"sd1": {"params": 1_066_000_000, "unet_channels": 320, "vae_channels": 128},
            "sd2": {"params": 1_290_000_000, "unet_channels": 320, "vae_channels": 128},
            "sdxl": {"params": 3_470_000_000, "unet_channels": 320, "vae_channels": 128}}
"""Published sizes (UNet + text encoders + VAE) by family, for an advert that gives a family but no count."""
UPSCALER_CHANNELS = 256
"""The first block of Stable Diffusion's x4 upscaler's UNet, for an advert that gives no channels."""
FAMILIES = tuple(K_UNET)
MAX_CHANNELS = 1 << 14


# ------------------------------------------------------------------ sizes
def _clean(size: Any) -> dict[str, Any] | None:
    """A size advert with its figures checked (None when it has no usable weight count)."""
    if not isinstance(size, dict):
        return None
    out: dict[str, Any] = {}
    for key, hi in (("params", model_size.PARAMS_MAX), ("unet_channels", MAX_CHANNELS),
                    ("vae_channels", MAX_CHANNELS)):
        v = size.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= hi:
            out[key] = v
    if size.get("family") in FAMILIES:
        out["family"] = size["family"]
    return out if "params" in out else None


def advertised_sizes(session: Session, hashes: set[str]) -> dict[str, dict[str, Any]]:
    """hash → the median of each size figure the registered workers advertised for it."""
    seen: dict[str, list[dict[str, Any]]] = {h: [] for h in hashes}
    for caps in session.exec(select(Worker.capabilities)):
        for m in (caps or {}).get("models") or []:
            if isinstance(m, dict) and m.get("hash") in seen and (s := _clean(m.get("size"))):
                seen[m["hash"]].append(s)
    out = {}
    for h, sizes in seen.items():
        if not sizes:
            continue
        med = {k: int(statistics.median_low([s[k] for s in sizes if k in s]))
               for k in ("params", "unet_channels", "vae_channels") if any(k in s for s in sizes)}
        fams = [s["family"] for s in sizes if "family" in s]
        out[h] = {**med, **({"family": statistics.mode(fams)} if fams else {})}
    return out


PIECE_DIRS = {"lora": model_folders.LORA_DIR, "controlnet": model_folders.CONTROLNET_DIR,
              "refiner": model_folders.REFINER_DIR, "upscaler": model_folders.UPSCALER_DIR}
"""Where a models folder keeps each kind of piece (a model itself is found by name, hub cache included)."""


def local_size(name: str, kind: str) -> dict[str, Any] | None:
    """The size of the coordinator's own copy of ``name`` (a model, LoRA, ControlNet, SDXL refiner or
    upscaler: ``kind``), if it has one. The name is a file or folder name, never a path."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    if kind != "pipeline":
        sub = PIECE_DIRS[kind]
        for d in model_folders.configured_dirs():
            for p in ((d / sub / f"{name}.safetensors"), (d / sub / name)):
                if p.exists() and (p.is_dir() or kind == "lora"):
                    return _clean(model_size.size_of(p, kind))
        return None
    path = dict(model_folders.find(model_folders.configured_dirs(), hub=True)).get(name)
    return _clean(model_size.size_of(path, kind)) if path is not None and path.is_dir() else None


# ------------------------------------------------------------------ the need
def estimate(model: dict[str, Any], loras: list[dict[str, Any]], controls: list[dict[str, Any]], width: int,
             height: int, per_task: int, device: str, refiner: dict[str, Any] | None = None,
             upscaler: dict[str, Any] | None = None) -> int:
    """Bytes one task needs on ``device`` (``cuda`` or ``cpu``): the formula of the module docstring."""
    family = model.get("family", "sd1")
    base = DEFAULTS.get(family, DEFAULTS["sd1"])
    b = BYTES_PER_WEIGHT[device]
    params = model.get("params", base["params"]) + sum(p["params"] for p in loras + controls)
    params += sum(p.get("params", 0) for p in (refiner, upscaler) if p)
    px, k = (width // 8) * (height // 8), K_UNET.get(family, K_UNET["sd1"])
    unet = k * model.get("unet_channels", base["unet_channels"]) * px * per_task * 2 * b
    unet += sum(k * c.get("unet_channels", base["unet_channels"]) * px * per_task * 2 * b * CONTROLNET_SHARE
                for c in controls)
    vae = K_VAE * model.get("vae_channels", base["vae_channels"]) * width * height * per_task * b
    up = 0.0
    if upscaler:
        up = max(K_UNET["sd1"] * upscaler.get("unet_channels", UPSCALER_CHANNELS) * width * height * 2 * b,
                 K_VAE * upscaler.get("vae_channels", base["vae_channels"]) * 16 * width * height * b)
    return int((params * b + max(unet, vae, up)) * (1 + MARGIN) + FIXED[device])


def booked_size(settings: dict[str, Any], src: Any) -> tuple[int, int]:
    """(width, height) a diffusion job is booked at: its own size; over a source job's (``src``, a Job)
    frames, the resolution that job forced, else 512x512 (a scene's own resolution is in the scene file,
    which the coordinator does not open: an under-booked task that runs out fails and is retried)."""
    if settings.get("width") and settings.get("height"):
        return settings["width"], settings["height"]
    rs = (getattr(src, "spec", None) or {}).get("settings") or {}
    res, pct = rs.get("resolution"), rs.get("resolution_percent") or 100
    if isinstance(res, (list, tuple)) and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res) \
            and isinstance(pct, int):
        return max(8, res[0] * pct // 100), max(8, res[1] * pct // 100)
    return 512, 512


def job_need(session: Session, model: str, model_hash: str, loras: list[dict], controls: list[dict],
             width: int, height: int, per_task: int, refiner: dict | None = None,
             upscale: dict | None = None) -> dict[str, int] | None:
    """``{"cuda": bytes, "cpu": bytes}`` for a job of these pinned pieces, or None when the size of the
    model or of a piece is known to nobody (then nothing is booked)."""
    pipes = [p for p in (refiner, upscale) if p]
    hashes = {model_hash, *(p["hash"] for p in loras + controls + pipes)}
    ads = advertised_sizes(session, hashes)

    def size(name: str, h: str, kind: str) -> dict[str, Any] | None:
        return local_size(name, kind) or ads.get(h)
    m = size(model, model_hash, "pipeline")
    pieces = [size(p["name"], p["hash"], "lora") for p in loras]
    nets = [size(c["name"], c["hash"], "controlnet") for c in controls]
    ref = size(refiner["name"], refiner["hash"], "refiner") if refiner else None
    up = size(upscale["name"], upscale["hash"], "upscaler") if upscale else None
    if m is None or None in pieces or None in nets or (refiner and ref is None) or (upscale and up is None):
        return None
    return {dev: estimate(m, pieces, nets, width, height, per_task, dev, ref, up) for dev in BYTES_PER_WEIGHT}


# ------------------------------------------------------------------ the worker's side
def worker_memory(capabilities: dict[str, Any] | None) -> tuple[str, int]:
    """(device kind, bytes one task may use) that a HELLO's capabilities advertise (see the docstring)."""
    mem = (capabilities or {}).get("memory") if isinstance(capabilities, dict) else None
    if isinstance(mem, dict) and mem.get("device") in BYTES_PER_WEIGHT:
        n = mem.get("bytes")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return mem["device"], n
    return "cpu", UNADVERTISED_BYTES


def fits(need: Any, memory: tuple[str, int]) -> bool:
    """Whether a task of ``need`` (a spec's ``memory_need``) fits a worker of ``memory``."""
    if not isinstance(need, dict):
        return True
    n = need.get(memory[0])
    return not isinstance(n, int) or n <= memory[1]


def check_some_worker_fits(session: Session, need: dict[str, int] | None, model: str, hashes: set[str]) -> None:
    """JobError (422) when no registered worker holding every one of ``hashes`` could ever fit ``need``,
    naming the need and the largest such worker."""
    if need is None:
        return
    best: tuple[int, str, str] | None = None
    for w in session.exec(select(Worker)):
        caps = w.capabilities or {}
        held = {m.get("hash") for m in caps.get("models") or [] if isinstance(m, dict) and not m.get("error")}
        if not hashes <= held:
            continue
        mem = worker_memory(caps)
        if fits(need, mem):
            return
        if best is None or mem[1] > best[0]:
            best = (mem[1], mem[0], w.id)
    if best is None:  # nobody holds them: the pinning checks answer that
        return
    raise JobError(f"a task of this job needs {need['cuda'] / GiB:.1f} GiB on a GPU worker ({need['cpu'] / GiB:.1f} "
                   f"GiB on a CPU worker), and the largest worker holding {model!r} has {best[0] / GiB:.1f} GiB "
                   f"({best[2]}, {best[1]}): make smaller images (--size), fewer a task (--per-task 1) or use "
                   "fewer ControlNets", 422)
