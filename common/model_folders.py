"""Stable Diffusion model folders on local disk: finding them, checking them, naming and hashing them.

Used by the worker daemon (what it advertises in HELLO), by the coordinator (prompt token limits at
submit) and by the CLI (a local ``--model PATH``). Imports neither torch nor transformers: only the
standard library, plus the ``tokenizers`` library (Rust, no torch) for counting prompt tokens.

A model folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` plus one
subfolder per component. They are found in folders given by the user (a model folder itself, or a folder
of model folders, one level down) and in the local Hugging Face hub cache (``models--org--name`` with
``snapshots/<revision>``, named ``org/name``). LoRA weights are single files in a ``loras/`` folder of a
models folder (``models/loras/NAME.safetensors``, named NAME), advertised with ``kind: "lora"``; ControlNets are folders in
a ``controlnets/`` folder (``models/controlnets/NAME/`` as ``ControlNetModel.save_pretrained`` writes it),
advertised with ``kind: "controlnet"``; upscalers are pipeline folders (a ``StableDiffusionUpscalePipeline``) in an
``upscalers/`` folder, ``kind: "upscaler"``; SDXL refiners are ``StableDiffusionXLImg2ImgPipeline`` folders in a
``refiners/`` folder, ``kind: "refiner"``; textual-inversion embeddings are safetensors files in an ``embeddings/``
(or ``textual_inversions/``) folder, ``kind: "embedding"``. Invariants:

* a model's **hash** is the sha256 over the sorted (relative path, sha256 of the file) of all its files
  (hidden files excluded), so it names the exact weights wherever the folder lives; file hashes are
  cached by (path, size, mtime) in a JSON file, so a restart re-reads nothing that did not change;
* :func:`check` finds what would make loading fail (missing component folder, config or weights, a
  truncated safetensors file) without loading anything; a folder that fails it is reported with its
  error and an empty hash, never used;
* a LoRA is a safetensors file of at most :data:`LORA_MAX_BYTES` whose header names LoRA tensors; its hash
  is the file's sha256; any other file in ``loras/`` (pickles above all) is reported with its error;
* a ControlNet folder holds a config.json naming ControlNetModel and safetensors weights only (no pickle),
  at most :data:`CONTROLNET_MAX_BYTES` in all; its hash is the folder hash, like a model's;
* an upscaler (refiner) folder passes :func:`check` like a model and its model_index names one of
  :data:`UPSCALERS` (:data:`REFINERS`);
* an embedding is a safetensors file of at most :data:`EMBEDDING_MAX_BYTES` whose header holds one or two
  float tensors of at most :data:`EMBEDDING_MAX_VECTORS` vectors (``emb_params``, ``<token>``, or SDXL's
  ``clip_l``/``clip_g``); its hash is the file's sha256;
* nothing here downloads anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

MODEL_INDEX = "model_index.json"
BUILD_HINT = ("save a complete pipeline there (DiffusionPipeline.save_pretrained(DIR)), copy the model folder "
              "again, or for tests run `farm models tiny --out DIR`")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files in Python's pickle format (torch.save): loading one runs whatever code it carries."""

DEFAULT_TOKEN_LIMIT = 77

LORA_DIR = "loras"
"""The folder of LoRA files inside a models folder (never itself a model)."""
LORA_MAX_BYTES = 2 << 30
"""Largest LoRA file accepted (SDXL LoRAs of rank 128 are about 1.7 GB)."""
CONTROLNET_DIR = "controlnets"
"""The folder of ControlNet folders inside a models folder (never itself a model)."""
CONTROLNET_MAX_BYTES = 8 << 30
"""Largest ControlNet folder accepted (an SDXL ControlNet in float32 is about 5 GB)."""
UPSCALER_DIR = "upscalers"
"""The folder of upscaler pipeline folders inside a models folder (never itself a model)."""
UPSCALERS = {"StableDiffusionUpscalePipeline": 4}
"""Upscale pipeline classes accepted (model_index ``_class_name``) → their scale factor."""
REFINER_DIR = "refiners"
"""The folder of SDXL refiner pipeline folders inside a models folder (never itself a model)."""
REFINERS = ("StableDiffusionXLImg2ImgPipeline",)
"""Refiner pipeline classes accepted (model_index ``_class_name``)."""
EMBEDDING_DIRS = ("embeddings", "textual_inversions")
"""The folders of textual-inversion embeddings inside a models folder (never themselves models)."""
EMBEDDING_MAX_BYTES = 16 << 20
"""Largest embedding file accepted (a 75-vector SDXL embedding in float32 is under 1 MB)."""
EMBEDDING_MAX_VECTORS = 75
"""Most vectors one embedding may add (the prompt itself holds 75 tokens)."""
EMBEDDING_DTYPES = ("F16", "BF16", "F32", "F64")
NOT_MODELS = (LORA_DIR, CONTROLNET_DIR, UPSCALER_DIR, REFINER_DIR, *EMBEDDING_DIRS)
"""Folders of a models folder that hold pieces, never pipelines."""
LORA_KEY_MARKS = ("lora_A", "lora_B", "lora_up", "lora_down", "lora.up", "lora.down")
"""Substrings of the tensor names of a LoRA in the diffusers/peft or kohya layouts."""


@dataclass(frozen=True)
class ModelFolder:
    """One model on this machine: ``hash`` is "" and ``error`` says why when the folder is unusable."""
    name: str
    path: Path
    hash: str = ""
    error: str = ""
    kind: str = "pipeline"  # or "lora" / "embedding": one safetensors file; "controlnet" / "upscaler": a folder

    @property
    def ok(self) -> bool:
        return bool(self.hash) and not self.error

    def advert(self) -> dict[str, str]:
        """The entry of HELLO ``capabilities["models"]``."""
        return {"name": self.name, "hash": self.hash, **({"error": self.error[:300]} if self.error else {}),
                **({"kind": self.kind} if self.kind != "pipeline" else {})}


# ------------------------------------------------------------------ finding
def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, resolved like huggingface_hub does (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def configured_dirs(value: str | Iterable[str] | None = None) -> list[Path]:
    """Model dirs from ``--models`` values (each may hold several, os.pathsep-separated) or, when none
    are given, from RENDERHIVE_MODELS."""
    if value is None:
        value = os.environ.get("RENDERHIVE_MODELS", "")
    parts = [value] if isinstance(value, str) else list(value)
    return [Path(p).expanduser() for part in parts for p in str(part).split(os.pathsep) if p.strip()]


def find(dirs: Iterable[Path], hub: bool = True) -> list[tuple[str, Path]]:
    """(name, folder) of every model folder under ``dirs`` and, with ``hub``, in the hub cache. A folder
    that exists but is no model (no model_index.json) is reported too, so that a typo is not silent."""
    found: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        if (d / MODEL_INDEX).exists() or not d.is_dir():
            found.setdefault(d.name, d)
            continue
        subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_MODELS)
        for p in subs:
            if (p / MODEL_INDEX).exists() or any(p.iterdir()):
                found.setdefault(p.name, p)
    if hub:
        for name, path in find_hub(hub_cache_dir()):
            found.setdefault(name, path)
    return sorted(found.items())


def find_hub(cache: Path) -> list[tuple[str, Path]]:
    """Pipelines in a hub cache: the snapshot that refs/main points at (else the newest one)."""
    out = []
    if not cache.is_dir():
        return out
    for repo in sorted(cache.glob("models--*")):
        snaps = repo / "snapshots"
        ref = repo / "refs" / "main"
        snap = snaps / ref.read_text().strip() if ref.is_file() else None
        if snap is None or not (snap / MODEL_INDEX).is_file():
            cands = [p for p in snaps.glob("*") if (p / MODEL_INDEX).is_file()] if snaps.is_dir() else []
            snap = max(cands, key=lambda p: p.stat().st_mtime) if cands else None
        if snap is not None:
            out.append((repo.name[len("models--"):].replace("--", "/"), snap))
    return out


# ------------------------------------------------------------------ checking
def safetensors_header(path: Path) -> tuple[int, dict]:
    """(length, JSON header) of a .safetensors file: its tensor names, dtypes, shapes and offsets. Raises
    ValueError saying what is wrong (OSError when unreadable)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("is empty or truncated")
        n = struct.unpack("<Q", raw)[0]
        if n > min(os.fstat(f.fileno()).st_size - 8, 100 * 1024 * 1024):
            raise ValueError("has a corrupt header")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("has a corrupt header")
    return n, header


def _safetensors_problem(path: Path) -> str:
    """Why a .safetensors file cannot be loaded ("" when its header and size are consistent)."""
    try:
        size = path.stat().st_size
        n, header = safetensors_header(path)
    except ValueError as exc:
        return str(exc) if str(exc).startswith(("is ", "has ")) else f"cannot be read ({exc})"
    except OSError as exc:
        return f"cannot be read ({exc})"
    end = max((v.get("data_offsets", [0, 0])[1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict)), default=0)
    if 8 + n + end != size:
        return f"is truncated or padded ({size} bytes, the header describes {8 + n + end})"
    return ""


def _component_problem(folder: Path, key: str, cls: str) -> str:
    sub = folder / key
    if not sub.is_dir():
        return f"component folder {key}/ is missing"
    files = {p.name for p in sub.iterdir()}
    if key == "scheduler" or cls.endswith("Scheduler"):
        need = "scheduler_config.json"
    elif "Tokenizer" in cls:
        if "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files:
            return ""
        return f"{key}/ has neither tokenizer.json nor vocab.json and merges.txt"
    elif "Processor" in cls or "FeatureExtractor" in cls:
        need = "preprocessor_config.json"
    else:
        need = "config.json"
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled:  # unpickling runs code: a model folder is as untrusted as a scene
            return (f"{key}/{pickled[0]} holds pickled weights, which can run code when loaded: only "
                    "safetensors are accepted (convert with DiffusionPipeline.from_pretrained(DIR)"
                    ".save_pretrained(DIR, safe_serialization=True) on a machine you trust, then delete the "
                    f"{', '.join(sorted({Path(f).suffix for f in pickled}))} files)")
        weights = [f for f in files if f.endswith(".safetensors") or f.endswith(".safetensors.index.json")]
        if not weights:
            return f"{key}/ has no weights (*.safetensors)"
        for f in sorted(w for w in weights if w.endswith(".safetensors")):
            problem = _safetensors_problem(sub / f)
            if problem:
                return f"{key}/{f} {problem}"
    if need not in files:
        return f"{key}/{need} is missing"
    try:
        json.loads((sub / need).read_text())
    except (OSError, ValueError) as exc:
        return f"{key}/{need} is not valid JSON ({exc})"
    return ""


def check(folder: Path) -> str:
    """What makes ``folder`` unusable as a pipeline ("" when it looks complete). Reads headers only."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist: {BUILD_HINT}"
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except FileNotFoundError:
        return f"{folder} has no {MODEL_INDEX}, so it is not a diffusers pipeline folder: {BUILD_HINT}"
    except (OSError, ValueError) as exc:
        return f"{folder / MODEL_INDEX} is not valid JSON ({exc}): {BUILD_HINT}"
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        return f"{folder / MODEL_INDEX} names no pipeline class: {BUILD_HINT}"
    for key, val in index.items():
        if key.startswith("_") or not isinstance(val, list) or len(val) != 2 or None in val:
            continue
        problem = _component_problem(folder, key, str(val[1]))
        if problem:
            return f"model folder {folder} is incomplete or corrupt: {problem}; {BUILD_HINT}"
    if "unet" not in index or "tokenizer" not in index:
        return f"{folder} is a {index['_class_name']}, not a Stable Diffusion pipeline (no unet/tokenizer)"
    return ""


def family(folder: Path) -> str:
    """"sdxl" for a Stable Diffusion XL pipeline folder (its model_index names an XL class), else "sd"."""
    try:
        name = json.loads((Path(folder) / MODEL_INDEX).read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return "sd"
    return "sdxl" if "XL" in str(name) else "sd"


def inpainting(folder: Path) -> bool:
    """Whether the model's UNet takes 9 input channels (an inpainting model: it needs an image and a mask)."""
    try:
        return json.loads((Path(folder) / "unet" / "config.json").read_text()).get("in_channels") == 9
    except (OSError, ValueError, AttributeError):
        return False


# ------------------------------------------------------------------ hashing
class HashCache:
    """sha256 of files, remembered by (real path, size, mtime_ns) in a JSON file (thread-safe)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.lock = threading.Lock()
        self.entries: dict[str, list[Any]] = {}
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def file_sha256(self, path: Path) -> str:
        real = os.path.realpath(path)  # hub snapshots are symlinks into blobs/
        st = os.stat(real)
        key = [st.st_size, st.st_mtime_ns]
        with self.lock:
            hit = self.entries.get(real)
        if hit and hit[:2] == key:
            return hit[2]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        with self.lock:
            self.entries[real] = [*key, h.hexdigest()]
        return h.hexdigest()

    def save(self) -> None:
        if not self.path:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self.lock:
            tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)


def folder_hash(folder: Path, cache: HashCache | None = None) -> str:
    """The model's identity: sha256 over its sorted (relative path, file sha256) pairs."""
    cache = cache or HashCache(None)
    folder = Path(folder)
    lines = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            lines.append(f"{p.relative_to(folder).as_posix()}\t{cache.file_sha256(p)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def find_loras(dirs: Iterable[Path]) -> list[tuple[str, Path]]:
    """(name, file) of every file in the ``loras/`` folder of each of ``dirs`` (first name wins)."""
    found: dict[str, Path] = {}
    for d in dirs:
        folder = Path(d) / LORA_DIR
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    found.setdefault(p.stem, p)
    return sorted(found.items())


def _weights_file_problem(path: Path, what: str, max_bytes: int, convert: str) -> str:
    """Why the single weights file ``path`` (a LoRA, an embedding: ``what``) cannot be loaded, from its suffix,
    size and safetensors header ("" when those are right); ``convert`` says how to turn a pickle into one."""
    if path.suffix != ".safetensors":
        why = "holds pickled weights, which can run code when loaded" if path.suffix in PICKLE_SUFFIXES else \
            "is not a .safetensors file"
        return (f"{what} {path.name} {why}: only safetensors files are accepted (convert it on a machine you trust, "
                f"e.g. {convert}, and delete the original)")
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{what} {path} cannot be read ({exc})"
    if size > max_bytes:
        return f"{what} {path.name} is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB"
    problem = _safetensors_problem(path)
    return f"{what} {path.name} {problem}: copy it again" if problem else ""


def check_lora(path: Path) -> str:
    """What makes ``path`` unusable as LoRA weights ("" when it looks right). Reads the header only."""
    path = Path(path)
    problem = _weights_file_problem(path, "LoRA file", LORA_MAX_BYTES,
                                    "safetensors.torch.save_file(torch.load(F), F.with_suffix('.safetensors'))")
    if problem:
        return problem
    keys = [k for k in safetensors_header(path)[1] if k != "__metadata__"]
    if not any(mark in k for k in keys for mark in LORA_KEY_MARKS):
        return (f"{path.name} holds no LoRA tensors (no names with lora_A/lora_B or lora_up/lora_down): only LoRA "
                f"weights belong in {LORA_DIR}/")
    return ""


def scan_loras(dirs: Iterable[Path], cache: HashCache) -> list[ModelFolder]:
    """Every LoRA file found, checked and hashed (the sha256 of the file)."""
    out = []
    for name, path in find_loras(dirs):
        problem, digest = check_lora(path), ""
        if not problem:
            try:
                digest = cache.file_sha256(path)
            except OSError as exc:
                problem = f"cannot read LoRA file {path}: {exc}"
        out.append(ModelFolder(name, path.resolve(), digest, problem, kind="lora"))
    return out


def check_controlnet(folder: Path) -> str:
    """What makes ``folder`` unusable as a ControlNet ("" when it looks complete). Reads headers only."""
    folder = Path(folder)
    problem = _component_problem(folder.parent, folder.name, "ControlNetModel")
    if problem:
        return f"ControlNet folder {folder} is incomplete or corrupt: {problem.replace(folder.name + '/', '', 1)}; " \
               "save it with ControlNetModel.save_pretrained(DIR, safe_serialization=True)"
    try:
        cls = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        cls = None
    if cls != "ControlNetModel":
        return f"{folder}/config.json names {cls!r}, not a ControlNetModel: only ControlNets belong in {CONTROLNET_DIR}/"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > CONTROLNET_MAX_BYTES:
        return f"ControlNet {folder.name} is {size / 2**30:.1f} GiB, over the limit of {CONTROLNET_MAX_BYTES >> 30} GiB"
    return ""


def scan_controlnets(dirs: Iterable[Path], cache: HashCache) -> list[ModelFolder]:
    """Every folder in a ``controlnets/`` folder of ``dirs``, checked and hashed (first name wins)."""
    found: dict[str, Path] = {}
    for d in dirs:
        folder = Path(d) / CONTROLNET_DIR
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_dir() and not p.name.startswith("."):
                    found.setdefault(p.name, p)
    out = []
    for name, path in sorted(found.items()):
        problem, digest = check_controlnet(path), ""
        if not problem:
            try:
                digest = folder_hash(path, cache)
            except OSError as exc:
                problem = f"cannot read ControlNet folder {path}: {exc}"
        out.append(ModelFolder(name, path.resolve(), digest, problem, kind="controlnet"))
    return out


def check_upscaler(folder: Path, kind: str = "upscaler") -> str:
    """What makes ``folder`` unusable as an upscaler (or, with kind "refiner", an SDXL refiner); "" when it
    looks complete. Reads headers only."""
    classes, where = (tuple(UPSCALERS), UPSCALER_DIR) if kind == "upscaler" else (REFINERS, REFINER_DIR)
    problem = check(folder)
    if problem:
        return problem.replace(BUILD_HINT, f"save it with {classes[0]}.save_pretrained(DIR) (for a test one: "
                               f"`farm models tiny-{kind} --out DIR`)")
    cls = json.loads((Path(folder) / MODEL_INDEX).read_text()).get("_class_name")
    if cls not in classes:
        article = "an" if kind[0] in "aeiou" else "a"
        return f"{folder} is a {cls}, not {article} {kind} ({', '.join(classes)}): only those belong in {where}/"
    return ""


def check_embedding(path: Path) -> str:
    """What makes ``path`` unusable as a textual-inversion embedding ("" when it looks right). Header only."""
    path = Path(path)
    problem = _weights_file_problem(path, "embedding", EMBEDDING_MAX_BYTES, "safetensors.torch.save_file("
                                    "{'emb_params': torch.load(F)['string_to_param']['*']}, 'NAME.safetensors')")
    if problem:
        return problem
    tensors = {k: v for k, v in safetensors_header(path)[1].items() if k != "__metadata__"}
    if not 1 <= len(tensors) <= 2:
        return (f"embedding {path.name} holds {len(tensors)} tensors: a textual inversion holds one (emb_params or "
                "its token) or SDXL's two (clip_l, clip_g)")
    for key, t in tensors.items():
        shape = t.get("shape") if isinstance(t, dict) else None
        if t.get("dtype") not in EMBEDDING_DTYPES or not isinstance(shape, list) or not 1 <= len(shape) <= 2 \
                or not all(isinstance(n, int) and n > 0 for n in shape) or shape[-1] > 4096 \
                or (len(shape) == 2 and shape[0] > EMBEDDING_MAX_VECTORS):
            return (f"embedding {path.name}: tensor {key!r} ({t.get('dtype')} {shape}) is no embedding (float "
                    f"vectors: [width] or [at most {EMBEDDING_MAX_VECTORS}, width])")
    return ""


def scan_pieces(dirs: Iterable[Path], cache: HashCache) -> list[ModelFolder]:
    """Every upscaler and refiner folder and embedding file found, checked and hashed (first name wins)."""
    found: dict[tuple[str, str], Path] = {}
    for d in dirs:
        for kind, subs in (("upscaler", (UPSCALER_DIR,)), ("refiner", (REFINER_DIR,)), ("embedding", EMBEDDING_DIRS)):
            for sub in subs:
                folder = Path(d) / sub
                for p in sorted(folder.iterdir()) if folder.is_dir() else []:
                    if not p.name.startswith(".") and (p.is_file() if kind == "embedding" else p.is_dir()):
                        found.setdefault((kind, p.stem if kind == "embedding" else p.name), p)
    out = []
    for (kind, name), path in sorted(found.items()):
        problem, digest = (check_embedding(path) if kind == "embedding" else check_upscaler(path, kind)), ""
        if not problem:
            try:
                digest = cache.file_sha256(path) if kind == "embedding" else folder_hash(path, cache)
            except OSError as exc:
                problem = f"cannot read {kind} {path}: {exc}"
        out.append(ModelFolder(name, path.resolve(), digest, problem, kind=kind))
    return out


def scan(dirs: Iterable[Path], cache_file: Path | None = None, hub: bool = True) -> list[ModelFolder]:
    """Every model folder, LoRA file, ControlNet, upscaler and embedding found, checked and hashed (hashes cached in ``cache_file``)."""
    dirs = list(dirs)
    cache = HashCache(cache_file)
    models = []
    for name, path in find(dirs, hub):
        problem = check(path)
        digest = ""
        if not problem:
            try:
                digest = folder_hash(path, cache)
            except OSError as exc:
                problem = f"cannot read model folder {path}: {exc}"
        models.append(ModelFolder(name, Path(path).resolve(), digest, problem))
    models += scan_loras(dirs, cache) + scan_controlnets(dirs, cache) + scan_pieces(dirs, cache)  # after the pipelines: code that takes
    # "the first model" gets one
    try:
        cache.save()
    except OSError:
        pass  # a read-only cache dir only costs re-hashing next time
    return models


# ------------------------------------------------------------------ prompt tokens
_tokenizers: dict[str, Any] = {}
_tok_lock = threading.Lock()


def token_counter(folder: Path):
    """``(count(text) -> int, limit)`` for the model's CLIP tokenizer: count includes the start and end
    tokens, as the text encoder sees them; limit is the tokenizer's model_max_length."""
    tdir = Path(folder) / "tokenizer"
    key = str(tdir.resolve())
    with _tok_lock:
        if key not in _tokenizers:
            _tokenizers[key] = _load_tokenizer(tdir)
    tok, limit = _tokenizers[key]
    return (lambda text: len(tok.encode(text).ids)), limit


def _load_tokenizer(tdir: Path):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    try:
        config = json.loads((tdir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    limit = int(config.get("model_max_length") or DEFAULT_TOKEN_LIMIT)
    if limit > 100_000:  # "no limit" sentinel of older configs: the text encoder's positions decide
        limit = DEFAULT_TOKEN_LIMIT
    if (tdir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(tdir / "tokenizer.json")), limit
    # vocab.json + merges.txt (the original CLIP release, SD 1.x repositories): CLIP's pipeline, as
    # transformers' CLIPTokenizer builds it
    vocab = json.loads((tdir / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (tdir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
              if len(line.split()) == 2]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                   r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", vocab["<|endoftext|>"]),
                                                      ("<|startoftext|>", vocab["<|startoftext|>"]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok, limit
