"""LoRA weights and ControlNets on the diffusion runtime's cached pipelines: LoRAs loaded once per (pipeline,
LoRA hash), stacked with per-job weights, and switched off for jobs without them; ControlNets loaded once
per (pipeline, ControlNet hash) and combined (diffusers' MultiControlNetModel) per job.

Used only by :mod:`worker.runtimes.diffusion` (inside the sandboxed child, after torch is imported). A
request's LoRAs are ``[{name, hash, weight, path}]``; the path comes from the worker's own scan of its
``loras/`` folders (:func:`common.model_folders.scan`), never from a job. Invariants:

* only safetensors files are loaded, re-checked here from their header (suffix, size cap, LoRA tensor
  names) before diffusers reads them; diffusers' ``load_lora_weights`` + ``set_adapters`` do the math,
  so an image equals the same pipeline called directly with the same LoRAs and weights (within float
  rounding of the adapter sum, tested at 1/255);
* the adapter of a LoRA is named after its hash: a job cannot reach another version loaded under the
  same name; at most :data:`MAX_ADAPTERS` stay loaded per pipeline, least recently used deleted first;
* a job without LoRAs runs with every adapter disabled, so what an earlier job loaded never leaks into
  its pixels (tested: equal to the pipeline without any LoRA loaded);
* a ControlNet folder is re-checked (:func:`common.model_folders.check_controlnet`) before it is loaded
  with ``use_safetensors=True``, and one built for another UNet (cross-attention width, blocks) is the
  job's fault, refused before generating; at most :data:`MAX_CONTROLNETS` stay loaded per pipeline.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

from common.model_folders import check_controlnet, check_lora

MAX_ADAPTERS = 16
"""LoRA adapters kept loaded on one cached pipeline (each costs its file size in memory)."""
MAX_CONTROLNETS = 4
"""ControlNets kept loaded for one cached pipeline (an SD 1.x ControlNet is about 0.7 GB in float16)."""


class AdapterError(Exception):
    """A LoRA cannot be applied; ``retryable`` when the fault is this worker's (its file), not the job's."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def adapter_name(lora_hash: str) -> str:
    return "lora_" + lora_hash[:16]


def apply_loras(entry: dict, loras: list[dict]) -> None:
    """Make ``entry["pipe"]`` (and the pipelines made from it, which share its modules) run with exactly
    ``loras`` at their weights: load what is missing, then set the active adapters (or disable them all)."""
    pipe = entry["pipe"]
    loaded: OrderedDict[str, str] = entry.setdefault("loras", OrderedDict())  # hash → adapter name
    if not loras:
        if loaded:
            pipe.disable_lora()
        return
    for lo in loras:
        weight = lo.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterError(f"LoRA {lo.get('name')!r}: weight {weight!r} is not a number", False)
    names = []
    for lo in loras:
        key = str(lo["hash"])
        if key in loaded:
            loaded.move_to_end(key)
        else:
            _load(entry, lo)
        names.append(loaded[key])
    pipe.enable_lora()
    pipe.set_adapters(names, [float(lo["weight"]) for lo in loras])


def _load(entry: dict, lo: dict) -> None:
    pipe, loaded = entry["pipe"], entry["loras"]
    try:
        import peft  # noqa: F401  (diffusers loads LoRAs through it)
    except ImportError:
        raise AdapterError("this worker cannot apply LoRAs: the peft package is missing from its environment "
                           "(pip install peft, then restart the worker)", True) from None
    path = Path(lo["path"])
    problem = check_lora(path)
    if problem:
        raise AdapterError(f"LoRA {lo.get('name')!r} cannot be used on this worker: {problem}", True)
    while len(loaded) >= MAX_ADAPTERS:
        key, old = loaded.popitem(last=False)
        pipe.delete_adapters(old)
        entry["bytes"] -= entry.get("lora_bytes", {}).pop(key, 0)
    name = adapter_name(str(lo["hash"]))
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    except Exception as e:  # the file was checked: what is left is a LoRA made for another architecture
        try:
            pipe.delete_adapters(name)  # a half-loaded adapter must not stay active
        except Exception:
            pass
        raise AdapterError(f"LoRA {lo.get('name')!r} does not fit model {entry.get('name', '')!r}: "
                           f"{type(e).__name__}: {str(e)[:300]} (a LoRA is trained for one model family: "
                           "pick one made for this model)", False) from None
    loaded[str(lo["hash"])] = name
    size = path.stat().st_size
    entry.setdefault("lora_bytes", {})[str(lo["hash"])] = size
    entry["bytes"] += size


def controlnets(entry: dict, controls: list[dict], load) -> tuple[list, list[float]]:
    """(ControlNet modules, conditioning scales) for ``controls`` (``[{name, hash, weight, path}]``), in order;
    ``load(path)`` makes a module (on the runtime's device and dtype) for one not loaded yet."""
    loaded: OrderedDict[str, object] = entry.setdefault("controlnets", OrderedDict())  # hash → ControlNetModel
    nets = []
    for c in controls:
        key = str(c["hash"])
        weight = c.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterError(f"ControlNet {c.get('name')!r}: weight {weight!r} is not a number", False)
        if key in loaded:
            loaded.move_to_end(key)
        else:
            problem = check_controlnet(Path(c["path"]))
            if problem:
                raise AdapterError(f"ControlNet {c.get('name')!r} cannot be used on this worker: {problem}", True)
            net = load(Path(c["path"]))
            unet = entry["pipe"].unet.config
            if (net.config.cross_attention_dim, tuple(net.config.block_out_channels)) != \
                    (unet.cross_attention_dim, tuple(unet.block_out_channels)):
                raise AdapterError(f"ControlNet {c.get('name')!r} was made for another model family than "
                                   f"{entry.get('name', '')!r} (its blocks or text width differ): pick one made "
                                   "for this model", False)
            in_use = {str(x["hash"]) for x in controls}
            for old in [k for k in loaded if k not in in_use][:max(0, len(loaded) + 1 - MAX_CONTROLNETS)]:
                del loaded[old]
                entry["bytes"] -= entry.get("controlnet_bytes", {}).pop(old, 0)
            loaded[key] = net
            size = sum(p.numel() * p.element_size() for p in net.parameters())
            entry.setdefault("controlnet_bytes", {})[key] = size
            entry["bytes"] += size
        nets.append(loaded[key])
    return nets, [float(c["weight"]) for c in controls]
