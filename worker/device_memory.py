"""What device memory this worker advertises for one diffusion task (HELLO ``capabilities["memory"]``,
booked against each job's need by the coordinator: ``farm.kinds.vram``).

* **CUDA** (the diffusion runtime child said its device is ``cuda[:N]``): the free memory of that GPU as
  ``nvidia-smi`` reports it, read after the runtime children started (so their CUDA contexts are already
  counted), split evenly between the slots whose children share the GPU (they may run tasks at once).
  The daemon never imports torch, so it asks the driver's tool, not ``torch.cuda.mem_get_info``; without
  ``nvidia-smi`` the GPU's size is unknown and only ``--vram-limit`` says it (else it advertises 0 bytes
  and gets no booked job, with a line saying so at start).
* **CPU**: the data limit of each sandboxed runtime child (``--max-memory``, default 3/4 of RAM), which is
  where a model and its activations live.
* ``farm worker --vram-limit GIB`` (or ``RENDERHIVE_VRAM_LIMIT`` in bytes) caps either figure: an owner
  sharing a GPU with other work lends only part of it.

Read once at start: free memory measured later would count this worker's own loaded pipelines as taken
(and the coordinator books a task by the job's need, which already includes the weights).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

SMI_TIMEOUT = 10.0
"""Seconds nvidia-smi may take (it can hang for seconds while the driver initialises a GPU)."""


def parse_smi(text: str) -> dict[int, tuple[int, int]]:
    """``nvidia-smi --query-gpu=index,memory.total,memory.free --format=csv,noheader,nounits`` output →
    index → (total bytes, free bytes). Lines it cannot read are skipped ("[N/A]" on some boards)."""
    out = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out[int(parts[0])] = (int(parts[1]) << 20, int(parts[2]) << 20)  # MiB
    return out


def gpu_memory() -> dict[int, tuple[int, int]]:
    """index → (total, free) bytes of every GPU nvidia-smi sees ({} without nvidia-smi or on any failure)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=SMI_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_smi(out.stdout) if out.returncode == 0 else {}


def physical_index(device: str) -> int:
    """The nvidia-smi index of a torch device name (``cuda`` is ``cuda:0``), through CUDA_VISIBLE_DEVICES
    when that lists plain indices."""
    ordinal = int(device.split(":")[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ordinal < len(visible) and visible[ordinal].isdigit():
        return int(visible[ordinal])
    return ordinal


def advert(devices: list[str], sandbox_bytes: int, limit: int | None,
           smi: dict[int, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The ``memory`` capability for runtime children on ``devices`` (one torch device name a slot):
    ``{"device": "cuda"|"cpu", "bytes": per task, "source": how it was found}``; see the docstring."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        n, source = sandbox_bytes, "sandbox memory limit"
    else:
        smi = gpu_memory() if smi is None else smi
        shares = {}
        for d in cuda:
            i = physical_index(d)
            shares[i] = shares.get(i, 0) + 1
        known = [smi[i][1] // k for i, k in shares.items() if i in smi]
        if len(known) == len(shares):
            n, source = min(known), "nvidia-smi free memory" + (" split between slots" if max(shares.values()) > 1
                                                                 else "")
        else:
            n, source = 0, "unknown (no nvidia-smi)"
    if limit is not None and (limit < n or not n):
        n, source = limit, "--vram-limit"
    return {"device": "cuda" if cuda else "cpu", "bytes": max(0, int(n)), "source": source}


def parse_limit(text: str) -> int:
    """``--vram-limit`` value → bytes: GiB as a number (``6``, ``1.5``), or with a unit (``512M``, ``6G``,
    ``6GiB``, ``4096MB``: binary units either way). ValueError says what is accepted."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 0)
    try:
        v = float(t[:-1] if scale else t) * (scale or 1 << 30)
    except ValueError:
        v = -1
    if not 0 < v < 1 << 50:
        raise ValueError(f"--vram-limit {text!r}: give GiB (e.g. 6 or 1.5) or a size like 512M or 6G")
    return int(v)
