"""LoRA weights, ControlNets and textual-inversion embeddings on the diffusion runtime's cached pipelines:
LoRAs loaded once per (pipeline, LoRA hash), stacked with per-job weights, and switched off for jobs without
them; ControlNets loaded once per (pipeline, ControlNet hash) and combined (diffusers' MultiControlNetModel)
per job; embeddings loaded for one request and unloaded after it.

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
  job's fault, refused before generating; at most :data:`MAX_CONTROLNETS` stay loaded per pipeline;
* an embedding file is re-checked (:func:`common.model_folders.check_embedding`) and loaded with diffusers'
  ``load_textual_inversion`` under the job's token for that request only (SDXL: ``clip_l`` and ``clip_g`` into
  the two text encoders); :func:`unload_embeddings` removes
  the tokens afterwards and verifies that the tokenizer and the text encoder's embedding table are back to
  their size before, so one job's tokens never reach another job's prompts (tested: a later job writing the
  token gets the pixels of the pipeline that never loaded it); when that cannot be verified the caller
  drops the cached pipeline.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

from common.model_folders import check_controlnet, check_embedding, check_lora

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
                entry.pop("control_pipe", None)  # the runtime's cached ControlNet pipeline may hold it
                entry["bytes"] -= entry.get("controlnet_bytes", {}).pop(old, 0)
            loaded[key] = net
            size = sum(p.numel() * p.element_size() for p in net.parameters())
            entry.setdefault("controlnet_bytes", {})[key] = size
            entry["bytes"] += size
        nets.append(loaded[key])
    return nets, [float(c["weight"]) for c in controls]


def _encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs of the pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def load_embeddings(entry: dict, embeddings: list[dict]) -> dict | None:
    """Load ``embeddings`` (``[{name, hash, token, path}]``) into ``entry["pipe"]``'s tokenizers and text encoders
    for one request (an SDXL embedding's ``clip_l`` into the first, its ``clip_g`` into the second). Returns
    what :func:`unload_embeddings` needs (None when there are none)."""
    if not embeddings:
        return None
    pipe = entry["pipe"]
    xl = entry.get("family") == "sdxl"
    before = {"tokens": [], "pairs": [(set(tok.get_added_vocab()), len(tok), enc.get_input_embeddings().weight.shape[0])
                                      for tok, enc in _encoders(pipe)]}
    try:
        for emb in embeddings:
            path = Path(emb["path"])
            problem = check_embedding(path)
            if problem:
                raise AdapterError(f"embedding {emb.get('name')!r} cannot be used on this worker: {problem}", True)
            token = str(emb["token"])
            if any(token in tok.get_vocab() for tok, _enc in _encoders(pipe)):
                raise AdapterError(f"embedding {emb.get('name')!r}: its token {token!r} is already a word of model "
                                   f"{entry.get('name', '')!r}: give another token (--embedding NAME:TOKEN)", False)
            before["tokens"].append(token)  # before loading: a half-done load is undone too
            try:
                if xl:
                    from safetensors.torch import load_file
                    tensors = load_file(str(path))
                    if set(tensors) != {"clip_l", "clip_g"}:
                        raise ValueError(f"an SDXL embedding holds clip_l and clip_g, this one {sorted(tensors)}")
                    for key, (tok, enc) in zip(("clip_l", "clip_g"), _encoders(pipe)):
                        pipe.load_textual_inversion(tensors[key], token=token, tokenizer=tok, text_encoder=enc)
                else:
                    pipe.load_textual_inversion(str(path), token=token)
            except Exception as e:  # the file was checked: what is left is an embedding of another text width
                raise AdapterError(f"embedding {emb.get('name')!r} does not fit model {entry.get('name', '')!r}: "
                                   f"{type(e).__name__}: {str(e)[:300]} (an embedding is trained for one text "
                                   "encoder: pick one made for this model)", False) from None
    except BaseException:
        unload_embeddings(entry, before)
        raise
    return before


def unload_embeddings(entry: dict, state: dict | None) -> bool:
    """Remove the tokens :func:`load_embeddings` added; True when every tokenizer and embedding table is
    exactly its size before (False: the caller must drop this cached pipeline)."""
    if state is None:
        return True
    pipe = entry["pipe"]
    ok = True
    for (added, vocab, rows), (tok, enc) in zip(state["pairs"], _encoders(pipe)):
        try:
            new = [t for t in tok.get_added_vocab() if t not in added]  # with multi-vector tokens' extra ones
            if new:  # (TOKEN_1, ...), and even half of a failed load
                pipe.unload_textual_inversion(new, tokenizer=tok, text_encoder=enc)
        except Exception:
            return False
        ok = ok and (len(tok), enc.get_input_embeddings().weight.shape[0]) == (vocab, rows) \
            and not any(t in tok.get_vocab() for t in state["tokens"])
    return ok
