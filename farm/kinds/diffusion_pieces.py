"""The pieces a diffusion job needs on a worker — its model, its LoRAs, ControlNets, textual-inversion
embeddings, upscaler and SDXL refiner — resolved at submit from what registered workers advertise, and pinned by hash.

A worker advertises each model folder and each LoRA file it holds as ``{name, hash[, kind][, error]}`` in
HELLO ``capabilities["models"]`` (``kind`` absent for a pipeline, ``"lora"`` for LoRA weights, ``"controlnet"`` for a ControlNet; see
:mod:`common.model_folders`). A job names pieces by name (and may pin a hash), never by path. Invariants:

* a name resolves to the hash the request pinned if some worker holds it, else to the version most
  workers hold; a name nobody advertised, or whose every copy is corrupt, is a :class:`JobError`;
* at least one registered worker holds the model and every LoRA and ControlNet of the job together (online or not: a
  job can wait for its worker), so the job is never queued for a combination no worker can run;
* the job's spec lists every hash beyond the model in ``pieces``: :func:`farm.core.scheduler.fits` leases
  a task only to a worker that advertised all of them.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from sqlmodel import Session, select

from farm.kinds.jobs import JobError
from farm.store.models import Worker

MAX_LORAS = 8
"""LoRAs one job may stack (each adds its low-rank product to the same layers)."""
MAX_LORA_WEIGHT = 4.0
"""Largest absolute LoRA weight (the usual range is 0..1.5; beyond a few the images are noise)."""
HOW_TO_ADD = ("start a worker with `farm worker --models DIR` where DIR holds the model folder (for a test model: "
              "`farm models tiny --out DIR/tiny-sd`)")
HOW_TO_ADD_LORA = ("put the LoRA's .safetensors file in the loras/ folder of a worker's --models DIR and restart "
                   "the worker (for a test LoRA: `farm models tiny-lora --out DIR/loras/NAME.safetensors`)")
HOW_TO_ADD_CONTROLNET = ("put the ControlNet folder (ControlNetModel.save_pretrained) in the controlnets/ folder of a "
                         "worker's --models DIR and restart the worker (for a test ControlNet: `farm models "
                         "tiny-controlnet --model DIR/tiny-sd --out DIR/controlnets/NAME`)")
HOW_TO_ADD_EMBEDDING = ("put the embedding's .safetensors file in the embeddings/ folder of a worker's --models DIR and "
                        "restart the worker (for a test embedding: `farm models tiny-embedding --out "
                        "DIR/embeddings/NAME.safetensors`)")
HOW_TO_ADD_UPSCALER = ("put the upscaler folder (StableDiffusionUpscalePipeline.save_pretrained) in the upscalers/ "
                       "folder of a worker's --models DIR and restart the worker (for a test upscaler: `farm models "
                       "tiny-upscaler --out DIR/upscalers/NAME`)")
HOW_TO_ADD_REFINER = ("put the SDXL refiner folder (StableDiffusionXLImg2ImgPipeline.save_pretrained) in the refiners/ "
                      "folder of a worker's --models DIR and restart the worker (for a test refiner: `farm models "
                      "tiny-refiner --out DIR/refiners/NAME`)")
HOW_TO = {"pipeline": HOW_TO_ADD, "lora": HOW_TO_ADD_LORA, "controlnet": HOW_TO_ADD_CONTROLNET,
          "embedding": HOW_TO_ADD_EMBEDDING, "upscaler": HOW_TO_ADD_UPSCALER, "refiner": HOW_TO_ADD_REFINER}
KIND_WORDS = {"pipeline": "model", "lora": "LoRA", "controlnet": "ControlNet", "embedding": "embedding",
              "upscaler": "upscaler", "refiner": "refiner"}
MAX_EMBEDDINGS = 8
"""Textual-inversion embeddings one job may use (each adds its token to the prompt's vocabulary)."""
TOKEN = re.compile(r"^[^\s,:@]{1,64}$")
"""An embedding's token: one word of the prompt (no spaces; ':' and '@' separate NAME:TOKEN and NAME@HASH)."""
MAX_UPSCALE_STEPS = 100
MAX_UPSCALED_SIDE = 4096
"""Largest side of an upscaled image (the x4 upscaler's VAE decodes it whole: a 4096² decode needs ~20 GB)."""
MAX_NOISE_LEVEL = 350
"""Largest noise level of the x4 upscaler (its max_noise_level)."""
MAX_CONTROLS = 4
"""ControlNets one job may combine (each runs beside the UNet at every step)."""
MAX_CONTROL_WEIGHT = 4.0
"""Largest ControlNet conditioning scale (the usual range is 0.3..1.5)."""


def advertised(session: Session, kind: str = "pipeline") -> dict[str, list[tuple[str, str, str]]]:
    """Piece name → [(worker id, hash, error)] of the pieces of ``kind`` every registered worker advertised."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for w in session.exec(select(Worker)):
        for m in (w.capabilities or {}).get("models", []) or []:
            if isinstance(m, dict) and isinstance(m.get("name"), str) and (m.get("kind") or "pipeline") == kind:
                out.setdefault(m["name"], []).append((w.id, str(m.get("hash") or ""), str(m.get("error") or "")))
    return out


def resolve(session: Session, name: str, want_hash: str = "", kind: str = "pipeline") -> str:
    """The hash the job will use: ``want_hash`` if a worker holds it, else the version most workers hold."""
    word = KIND_WORDS[kind]
    if not name:
        raise JobError(f"{word} name is empty: name a {word} that workers hold (see `farm workers`)")
    ads = advertised(session, kind)
    held = ads.get(name)
    if not held:
        raise JobError(f"no worker has {word} {name!r} ({word}s on this farm: {', '.join(sorted(ads)) or 'none'}): "
                       + HOW_TO[kind])
    good = Counter(h for _w, h, err in held if h and not err)
    if not good:
        worker, _h, err = held[0]
        raise JobError(f"{word} {name!r} is corrupt on every worker that has it ({worker}: {err}); "
                       "repair it and restart the worker")
    if want_hash:
        if want_hash not in good:
            raise JobError(f"no worker holds this version of {word} {name!r} (hash {want_hash[:12]}…); workers "
                           f"hold {', '.join(h[:12] + '…' for h in sorted(good))}: copy yours to a worker or "
                           "name it without a hash")
        return want_hash
    return min(good, key=lambda h: (-good[h], h))


def resolve_model(session: Session, name: str, want_hash: str = "") -> str:
    return resolve(session, name, want_hash, "pipeline")


def parse_loras(value: Any) -> list[dict[str, Any]]:
    """``[{name, weight, hash?}]`` from the request, checked (at most MAX_LORAS, each name once)."""
    if value in (None, []):
        return []
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise JobError(f"loras must be a list of at most {MAX_LORAS} {{name, weight}} entries")
    out, seen = [], set()
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise JobError("each LoRA needs a name, e.g. {\"name\": \"ink\", \"weight\": 0.8} (--lora ink:0.8)")
        name = item["name"].strip()
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or abs(weight) > MAX_LORA_WEIGHT:
            raise JobError(f"LoRA {name!r}: weight must be a number from -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g} "
                           f"(got {weight!r})")
        if name in seen:
            raise JobError(f"LoRA {name!r} is named twice: give it once with the summed weight")
        seen.add(name)
        want = item.get("hash") or ""
        if not isinstance(want, str) or len(want) > 64:
            raise JobError(f"LoRA {name!r}: hash must be the sha256 of the file (64 hex digits)")
        out.append({"name": name, "weight": float(weight), "hash": want})
    return out


def resolve_loras(session: Session, loras: list[dict[str, Any]]) -> list[dict]:
    """Pin each LoRA's hash."""
    return [{"name": lo["name"], "hash": resolve(session, lo["name"], lo["hash"], "lora"), "weight": lo["weight"]}
            for lo in loras]


def parse_controls(value: Any) -> list[dict[str, Any]]:
    """``[{name, weight, image, hash?}]`` from the request: at most MAX_CONTROLS, weights 0..MAX_CONTROL_WEIGHT
    (the image, a blob's sha256, is checked by :mod:`farm.kinds.diffusion_inputs`)."""
    if value in (None, []):
        return []
    if not isinstance(value, list) or len(value) > MAX_CONTROLS:
        raise JobError(f"controls must be a list of at most {MAX_CONTROLS} {{name, weight, image}} entries")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise JobError("each control needs a ControlNet name and an image, e.g. --control depth:0.8 "
                           "--control-image depth.png")
        name, weight = item["name"].strip(), item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or not 0 <= weight <= MAX_CONTROL_WEIGHT:
            raise JobError(f"ControlNet {name!r}: weight must be a number from 0 to {MAX_CONTROL_WEIGHT:g} "
                           f"(got {weight!r})")
        want = item.get("hash") or ""
        if not isinstance(want, str) or len(want) > 64:
            raise JobError(f"ControlNet {name!r}: hash must be the sha256 of its folder (64 hex digits)")
        take = item.get("render_pass") or ""  # control_from_job: the pass it takes (default: its name)
        if not isinstance(take, str):
            raise JobError(f"ControlNet {name!r}: pass must be a render pass name")
        out.append({"name": name, "weight": float(weight), "hash": want, "image": item.get("image"), "pass": take})
    return out


def resolve_controls(session: Session, controls: list[dict[str, Any]]) -> list[dict]:
    """Pin each ControlNet's hash (the same ControlNet may appear twice, with two images)."""
    return [{**c, "hash": resolve(session, c["name"], c["hash"], "controlnet")} for c in controls]


def check_held_together(session: Session, model: str, model_hash: str, pieces: list[dict]) -> None:
    """JobError unless one registered worker advertised the model and every piece (by hash)."""
    if not pieces:
        return
    need = {model_hash, *(p["hash"] for p in pieces)}
    for w in session.exec(select(Worker)):
        ads = (w.capabilities or {}).get("models", []) or []
        if need <= {m.get("hash") for m in ads if isinstance(m, dict) and not m.get("error")}:
            return
    raise JobError(f"no single worker holds model {model!r} together with {', '.join(p['name'] for p in pieces)} "
                   "(each is on some worker, not all on one): copy the missing LoRA files (loras/), ControlNet "
                   "folders (controlnets/), embeddings (embeddings/) and upscalers (upscalers/) into one worker's "
                   "--models DIR and restart it")


def parse_embeddings(value: Any) -> list[dict[str, Any]]:
    """``[{name, token?, hash?}]`` from the request: at most MAX_EMBEDDINGS, each name and token once; the token
    defaults to the name (the file's stem, as in A1111: write it in the prompt)."""
    if value in (None, []):
        return []
    if not isinstance(value, list) or len(value) > MAX_EMBEDDINGS:
        raise JobError(f"embeddings must be a list of at most {MAX_EMBEDDINGS} {{name, token}} entries")
    out, tokens = [], set()
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise JobError("each embedding needs a name, e.g. {\"name\": \"ink\", \"token\": \"<ink>\"} "
                           "(--embedding ink:<ink>)")
        name = item["name"].strip()
        token = item.get("token") or name
        if not isinstance(token, str) or not TOKEN.match(token):
            raise JobError(f"embedding {name!r}: token {token!r} must be one word of at most 64 characters, without "
                           "spaces, ':' or '@' (write it in the prompt where the concept goes)")
        if token in tokens:
            raise JobError(f"embedding token {token!r} is given twice: give each embedding its own token")
        tokens.add(token)
        want = item.get("hash") or ""
        if not isinstance(want, str) or len(want) > 64:
            raise JobError(f"embedding {name!r}: hash must be the sha256 of the file (64 hex digits)")
        out.append({"name": name, "token": token, "hash": want})
    return out


def resolve_embeddings(session: Session, embeddings: list[dict[str, Any]]) -> list[dict]:
    """Pin each embedding's hash."""
    return [{**e, "hash": resolve(session, e["name"], e["hash"], "embedding")} for e in embeddings]


def parse_upscale(value: Any, settings: dict[str, Any]) -> dict[str, Any] | None:
    """``{name, steps, noise_level, hash?}`` from the request's ``upscale`` (a name, or that object); steps
    default to the job's. A size given must stay within MAX_UPSCALED_SIDE once upscaled (x4)."""
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise JobError("upscale must name an upscaler workers hold, e.g. \"x4\" or {\"name\": \"x4\", "
                       "\"steps\": 20, \"noise_level\": 20} (--upscale x4)")
    name = value["name"].strip()
    up_steps, noise = value.get("steps"), value.get("noise_level", 20)
    up_steps = settings["steps"] if up_steps is None else up_steps
    if max(settings.get("width") or 0, settings.get("height") or 0) * 4 > MAX_UPSCALED_SIDE:
        raise JobError(f"{settings['width']}x{settings['height']} upscaled x4 is over {MAX_UPSCALED_SIDE} pixels a "
                       f"side: generate at most {MAX_UPSCALED_SIDE // 4} pixels a side with --upscale")
    if isinstance(up_steps, bool) or not isinstance(up_steps, int) or not 1 <= up_steps <= MAX_UPSCALE_STEPS:
        raise JobError(f"upscaler {name!r}: steps must be a whole number from 1 to {MAX_UPSCALE_STEPS} (got {up_steps!r})")
    if isinstance(noise, bool) or not isinstance(noise, int) or not 0 <= noise <= MAX_NOISE_LEVEL:
        raise JobError(f"upscaler {name!r}: noise_level must be a whole number from 0 to {MAX_NOISE_LEVEL} "
                       f"(got {noise!r})")
    want = value.get("hash") or ""
    if not isinstance(want, str) or len(want) > 64:
        raise JobError(f"upscaler {name!r}: hash must be the sha256 of its folder (64 hex digits)")
    return {"name": name, "steps": up_steps, "noise_level": noise, "hash": want}


def resolve_upscale(session: Session, up: dict[str, Any] | None) -> dict | None:
    """Pin the upscaler's hash and record its scale (4: the only upscale pipeline class accepted)."""
    if up is None:
        return None
    return {**up, "hash": resolve(session, up["name"], up["hash"], "upscaler"), "scale": 4}


def parse_refiner(value: Any, steps: int) -> dict[str, Any] | None:
    """``{name, switch, hash?}`` from the request's ``refiner`` (a name, or that object): the SDXL refiner runs
    the last ``1 - switch`` of the job's denoising (default switch 0.8, as in diffusers' recipe)."""
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise JobError("refiner must name an SDXL refiner workers hold, e.g. {\"name\": \"refiner\", \"switch\": "
                       "0.8} (--refiner refiner:0.8)")
    name, switch = value["name"].strip(), value.get("switch")
    switch = 0.8 if switch is None else switch
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch < 1:
        raise JobError(f"refiner {name!r}: switch must be a number between 0 and 1, the share of the steps the base "
                       f"model runs (got {switch!r})")
    if int(steps * switch) < 1 or steps - int(steps * switch) < 1:
        raise JobError(f"refiner {name!r}: {steps} steps split at {switch:g} leave the base or the refiner no step: "
                       "raise --steps")
    want = value.get("hash") or ""
    if not isinstance(want, str) or len(want) > 64:
        raise JobError(f"refiner {name!r}: hash must be the sha256 of its folder (64 hex digits)")
    return {"name": name, "switch": float(switch), "hash": want}


def resolve_refiner(session: Session, ref: dict[str, Any] | None) -> dict | None:
    """Pin the refiner's hash."""
    return None if ref is None else {**ref, "hash": resolve(session, ref["name"], ref["hash"], "refiner")}
