"""How big a diffusion model, LoRA or ControlNet is, read from its files without loading it: the
figures memory booking (``farm.kinds.vram``) needs.

Used by the worker daemon (it advertises them with each model in HELLO) and by the coordinator (for its
own copy of a model, which it trusts over any worker's claim). Standard library only; nothing is loaded,
imported or downloaded.

* **params**: the number of weights, summed from the safetensors headers (8-byte length + JSON of dtypes
  and shapes: exact, a few kilobytes read per file); a pickle weight file (``.bin``) is counted from its
  size, 4 bytes a weight (float32, as ``save_pretrained`` writes them unless told otherwise);
* **family**: ``sd1`` / ``sd2`` / ``sdxl`` from the UNet's ``cross_attention_dim`` (768 / 1024 / 2048,
  what the text encoders produce), ``sdxl`` also when the model index names an XL pipeline; a folder whose
  configs say nothing is ``sd1``;
* **channels**: the first ``block_out_channels`` of the UNet and of the VAE decoder, which set how much
  memory one pixel of activations takes at the highest resolution (where the peak is).

Every figure is a plain int or str, bounded, so a hostile folder cannot make a HELLO large.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

HEADER_MAX = 100 << 20
"""Largest safetensors header read (real ones are under 1 MB; a corrupt length must not read gigabytes)."""
PARAMS_MAX = 10**11
"""Clamp of any weight count (100 G weights: far above every diffusion model)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
"""The pipeline parts that sit in device memory while an image is made (tokenizers and schedulers hold
no weights; a safety checker, when present, is loaded too and counted under its own folder name)."""


def safetensors_params(path: Path) -> int:
    """Weights in one safetensors file, from its header (0 when the header is unreadable)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if not 0 < n <= HEADER_MAX:
                return 0
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return 0
    total = 0
    for key, t in header.items() if isinstance(header, dict) else ():
        if key != "__metadata__" and isinstance(t, dict) and isinstance(t.get("shape"), list):
            if all(isinstance(d, int) and d >= 0 for d in t["shape"]):
                total += math.prod(t["shape"])
    return min(total, PARAMS_MAX)


def file_params(path: Path) -> int:
    """Weights in one weight file: exact for safetensors, size / 4 for a pickle."""
    if path.suffix == ".safetensors":
        return safetensors_params(path)
    try:
        return min(path.stat().st_size // 4, PARAMS_MAX)
    except OSError:
        return 0


def folder_params(folder: Path) -> int:
    """Weights in the weight files directly in ``folder`` (one component, or a ControlNet folder). Where a
    folder holds the same weights twice (``x.safetensors`` and ``x.bin``) only the safetensors count."""
    try:
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    except OSError:
        return 0
    stems = {p.stem for p in files if p.suffix == ".safetensors"}
    return min(sum(file_params(p) for p in files if p.suffix == ".safetensors" or p.stem not in stems), PARAMS_MAX)


def _config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _first_channels(cfg: dict[str, Any], default: int) -> int:
    ch = cfg.get("block_out_channels")
    if isinstance(ch, list) and ch and isinstance(ch[0], int) and 0 < ch[0] <= 1 << 14:
        return ch[0]
    return default


def family_of(folder: Path) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` (see the module docstring)."""
    index = _config(Path(folder) / "model_index.json")
    if "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    dim = _config(Path(folder) / "unet" / "config.json").get("cross_attention_dim")
    return {1024: "sd2", 2048: "sdxl"}.get(dim if isinstance(dim, int) else 0, "sd1")


def pipeline_size(folder: Path) -> dict[str, Any]:
    """``{"family", "params", "unet_channels", "vae_channels"}`` of a pipeline folder (save_pretrained's
    layout): params over the components that sit in device memory."""
    folder = Path(folder)
    names = [c for c in COMPONENTS if (folder / c).is_dir()]
    extra = [k for k, v in _config(folder / "model_index.json").items()
             if k == "safety_checker" and isinstance(v, list) and v and v[0]]
    params = sum(folder_params(folder / c) for c in names + extra)
    return {"family": family_of(folder), "params": min(params, PARAMS_MAX),
            "unet_channels": _first_channels(_config(folder / "unet" / "config.json"), 320),
            "vae_channels": _first_channels(_config(folder / "vae" / "config.json"), 128)}


def piece_size(path: Path) -> dict[str, Any]:
    """``{"params"}`` of a LoRA file or a ControlNet folder (plus ``channels`` of a ControlNet)."""
    path = Path(path)
    if path.is_dir():
        return {"params": folder_params(path), "unet_channels": _first_channels(_config(path / "config.json"), 320)}
    return {"params": file_params(path)}


PIPELINE_KINDS = ("pipeline", "refiner", "upscaler")
"""Model folder kinds laid out as whole pipelines (save_pretrained's folders of components)."""


def size_of(path: Path, kind: str) -> dict[str, Any]:
    """The size figures of a model folder entry: a pipeline (a model, an SDXL refiner, an upscaler), or a
    piece (a LoRA or textual-inversion file, a ControlNet folder)."""
    return pipeline_size(path) if kind in PIPELINE_KINDS else piece_size(path)
