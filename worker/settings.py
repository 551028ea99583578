"""A worker's own tunables: reconnect backoff, blob cache, runtime memory ceiling, render and diffusion
threads, tile overscan margins and the benchmark that measures its speed. Each with the reason it has its
value; tests shrink some through environment variables (``RENDERHIVE_<NAME>``).

Shared wire limits are in :mod:`common.limits`; the coordinator's policy in ``farm.constants``.
"""
from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(f"RENDERHIVE_{name}")
    return float(raw) if raw else default


RECONNECT_INITIAL = 1.0
"""First reconnect delay of a worker that lost the coordinator, in seconds."""

RECONNECT_MAX = 32.0
"""Cap of the exponential reconnect backoff (1 → 2 → 4 … → 32 s)."""

BLOB_TRANSFER_TIMEOUT = 5.0
"""Seconds without a chunk after which a transfer re-requests from its last verified offset."""

FETCH_PARALLEL = max(1, int(_env_float("FETCH_PARALLEL", 8)))
"""Inputs of one task fetched at once (a contact sheet's images, a tiled frame's tiles, a project's files): one
after the other, a 16-image sheet waited ~55 ms for its round trips. Each keeps its own credit window, so
at most this many windows are open for one task (8 × 4 MiB: PEER_SEND_BYTES, what the coordinator queues
for one peer)."""

PREFETCH_DEPTH = int(_env_float("PREFETCH", 1))
"""Tasks a slot holds beyond the one it renders (0 or 1; HELLO capability ``prefetch``): the next task's
lease and inputs arrive while the current one renders, so the slot starts it the moment that render ends
and the finished outputs upload meanwhile (:mod:`worker.pipeline`). Measured with ``bench/overhead.py``
(24 frames at 160x120, 16 samples): farm/direct 1.115 with 0, see bench/README.md for 1."""

WORKER_CACHE_BYTES = int(_env_float("WORKER_CACHE_BYTES", 20 * 1024**3))
"""Default size cap of a worker's blob cache (LRU)."""

RUNTIME_MAX_RSS_BYTES = int(_env_float("RUNTIME_MAX_RSS_BYTES", 16 * 1024**3))
"""A runtime child whose resident memory exceeds this after a task is restarted before the next one
(Blender and torch can fragment or leak over many scenes; a restart costs about a second)."""

DIFFUSION_CACHE_BYTES = int(_env_float("DIFFUSION_CACHE_BYTES", 0))
"""Memory for loaded pipelines in one diffusion runtime (LRU by model); 0: 70% of the GPU's memory on
CUDA, 40% of RAM on the CPU. The pipeline in use is always kept, even when it alone is bigger."""

TILE_OVERSCAN_DENOISE = 16
"""Pixels rendered around each tile, and cropped off, when the scene denoises (OpenImageDenoise needs
context across the seam). Measured on the sample scene, 4x4: seam error 2.8/255 with no margin, 0.24/255
with 16 px (below one 8-bit step: invisible), 0.17/255 with 32 px at twice the extra render area."""

TILE_OVERSCAN_ADAPTIVE = 4
"""Margin when Cycles adaptive sampling is on (and no denoising), up to TILE_OVERSCAN_ADAPTIVE_SAMPLES
samples; doubled for every 4x more samples, up to TILE_OVERSCAN_DENOISE. A pixel's sample count depends
on its neighbours' convergence at every check, so the reach grows with the number of checks. Measured
(sample scene, 4x4 and 8x8 tiles, bit-exact = no pixel differs): 256 samples: 2-3 px exact, 1 px not;
4096: 4 px exact, 3 px not (8x8, threshold 0.002); 16384: 8 px exact, 4 px differs on 10 pixels by at most
0.0017."""

TILE_OVERSCAN_ADAPTIVE_SAMPLES = 4096
"""Sample count up to which TILE_OVERSCAN_ADAPTIVE suffices (see there)."""

RENDER_THREADS = int(_env_float("RENDER_THREADS", 0))
"""Render threads of each Blender child (0: Blender's automatic choice, all cores). Set it when several
workers share one host, e.g. to measure how tiles of one frame spread over workers."""

VIDEO_DEFAULT_FPS = 24.0
"""Frame rate of a video whose frames carry no scene frame rate (see the Blender runtime's fps note)."""

VRAM_LIMIT_BYTES = int(_env_float("VRAM_LIMIT", 0))
"""Cap of the device memory a worker advertises for one diffusion task, in bytes (``farm worker
--vram-limit``; 0: no cap, what worker.device_memory finds). For an owner who shares the GPU with other
work; the coordinator then books no task bigger than this to the worker (farm.kinds.vram)."""

DIFFUSION_THREADS = int(_env_float("DIFFUSION_THREADS", 0))
"""CPU threads of each diffusion runtime (``torch.set_num_threads``); 0: torch's default, every core. On a
CPU worker with several slots, or a host shared with other work, give cores ÷ slots: torch's OpenMP threads
spin-wait for each other, and one that loses its core slows a step down many times over."""

BENCH_FRAME = 1
"""Frame of sample_scenes/turntable.blend rendered by the Blender benchmark."""

BENCH_BLENDER_SETTINGS = {"resolution_percent": 75, "samples": 16, "format": "PNG", "color_depth": "8"}
"""Render settings of the benchmark frame: 240x180, 16 samples, Cycles, no denoising. About 0.25 s on 2
CPU cores (50 % took 0.11 s, too short to time well; 100 % took 0.43 s); changing them changes every score
(they are part of the cache key)."""

BENCH_RUNS = 2
"""Renders of the benchmark frame; the score comes from the fastest (the first also loads the scene,
builds the BVH and compiles shaders, which a worker pays once per scene, not per frame)."""

BENCH_DIFFUSION = {"steps": 1, "width": 64, "height": 64, "seed": 1234, "guidance": 7.5,
                   "prompt": "a photo of a red cube on a table"}
"""The fixed generation of the diffusion benchmark, with the first model the worker holds (its hash is part
of the cache key: scores of different models do not compare)."""

BENCH_TIMEOUT = _env_float("BENCH_TIMEOUT", 300.0)
"""Seconds one benchmark measurement may take before it is abandoned (the worker then reports no score)."""

# ------------------------------------------------------------------ the sandbox of runtime children (worker.sandbox)
def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 1024**3


SANDBOX_MEMORY_BYTES = int(_env_float("SANDBOX_MEMORY_BYTES", 0)) or max(2 * 1024**3, int(_ram_bytes() * 0.75))
"""RLIMIT_DATA of each runtime child (heap and private writable mappings, not GPU memory): a scene that
needs more fails its task with "the scene needs more than N GiB", and the host keeps the rest. Default
three quarters of the host's RAM (``farm worker --max-memory`` sets it); bpy alone maps about 1 GiB of data
with a thread per core, so below 2 GiB nothing renders."""

SANDBOX_FILE_BYTES = int(_env_float("SANDBOX_FILE_BYTES", 8 * 1024**3))
"""RLIMIT_FSIZE of each runtime child: the largest single file it may write (an output frame, a cache
file of its own). 8 GiB holds a 16k×16k float EXR."""

SANDBOX_PROCESSES = int(_env_float("SANDBOX_PROCESSES", 4096))
"""RLIMIT_NPROC of each runtime child: its processes and threads together (Blender and torch start about
two threads a core; a fork bomb stops here, not at the host's limit)."""

TASK_SECONDS = _env_float("TASK_SECONDS", 6 * 3600.0)
"""Wall-clock limit of one task in a runtime child when its job sets none (``time_limit`` in the task's
settings, seconds per frame): a scene that runs longer is stopped and its task failed for good, with the
limit in the message. The CPU-time limit is this times the child's render threads (every core)."""

# ------------------------------------------------------------------ the owner's schedule and idle rule (worker.availability)
CLOCK_FILE = os.environ.get("RENDERHIVE_CLOCK_FILE", "")
"""Tests only: a file holding the local time ("HH:MM" or "HH:MM:SS" of today) that ``--schedule`` goes by,
read again at every look, so a test moves a real worker's clock by rewriting it. Unset: the real clock."""

IDLE_TTYS = tuple(p for p in os.environ.get("RENDERHIVE_IDLE_TTYS", "/dev/pts/*:/dev/tty[0-9]*").split(":") if p)
"""Terminal devices whose access time tells ``--idle-only`` when someone last typed (colon-separated globs;
tests point it at files of their own)."""

IDLE_SAMPLE_SECONDS = _env_float("IDLE_SAMPLE_SECONDS", 5.0)
"""Seconds between two readings of /proc for ``--idle-only`` (one reading lists /proc, about a millisecond)."""
