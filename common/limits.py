"""Limits both sides of the worker plane must agree on: the wire (header, heartbeats, blob chunks and
credit, message and upload sizes), the caps on what an untrusted scene or batch may ask for, and the unit
in which work is measured (the benchmark's work units).

The coordinator (``farm``) and the worker both import these; neither package's own tunables belong here
(``farm.constants``: coordinator policy; ``worker.settings``: a worker's own). Tests shrink some of them
through environment variables (``RENDERHIVE_<NAME>``).
"""
from __future__ import annotations

import os
import re


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(f"RENDERHIVE_{name}")
    return float(raw) if raw else default


PROTOCOL_HEADER = b"RHIVE/1"
"""First frame of every ZeroMQ message. A peer speaking another version is answered with ERROR."""

HEARTBEAT_INTERVAL = _env_float("HEARTBEAT_INTERVAL", 1.0)
"""Seconds between heartbeats, sent both ways, also while a worker renders (the render runs in a child)."""

HEARTBEAT_LIVENESS = 3
"""Missed heartbeat intervals after which the peer is presumed dead (Paranoid Pirate, RFC 6)."""

BLOB_CHUNK_SIZE = 1024 * 1024
"""Bytes per BLOB chunk the coordinator serves (downloads: WELCOME ``chunk_size``). 1 MiB rather than the
256 KiB of uploads: each chunk costs a round through both sides' Python, so a 4x bigger one cut the worker's
CPU per GiB by ~40 % and the coordinator's by ~30 % (bench/fanout.py). What a peer that reads nothing can
hold is bounded in bytes, not chunks (``farm.constants.PEER_SEND_BYTES``)."""

BLOB_WINDOW_BYTES = 4 * 1024 * 1024
"""Bytes of BLOB_GET requests a worker keeps in flight per blob (credit, zguide file transfer model 3)."""

BLOB_CREDIT = BLOB_WINDOW_BYTES // BLOB_CHUNK_SIZE
"""Chunks a peer may have in flight per blob (WELCOME ``credit``): the window in chunks."""

UPLOAD_CHUNK_SIZE = 256 * 1024
"""Bytes per BLOB_PUT chunk (uploads, worker → coordinator): what the coordinator receives stays small, so
its receive bound (``MAX_MESSAGE_BYTES``, per message) is as it was with 256 KiB chunks both ways."""

UPLOAD_CREDIT = 8
"""BLOB_PUT chunks a worker may have unacknowledged per upload."""

MAX_UPLOAD_BYTES = int(_env_float("MAX_UPLOAD_BYTES", 4 * 1024**3))
"""Largest blob accepted from a creator or a worker."""

MAX_MESSAGE_BYTES = UPLOAD_CHUNK_SIZE + 64 * 1024
"""Largest body frame a decoder accepts, BLOB's excepted; anything larger is malformed. Also the
coordinator's receive bound (ZeroMQ MAXMSGSIZE): nothing a worker sends may be larger."""

MAX_BLOB_MESSAGE_BYTES = BLOB_CHUNK_SIZE + 64 * 1024
"""Largest BLOB body (coordinator → worker) a decoder accepts."""

MAX_RESOLUTION = 16384
"""Largest render width or height a worker accepts from an untrusted scene."""

MAX_SAMPLES = 65536
"""Largest Cycles sample count a worker accepts."""

DIFFUSION_SCHEDULERS = {
    "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
}
"""Scheduler names a diffusion job may ask for → diffusers class, built from the model's own scheduler
config ("default": the model's scheduler as saved). The coordinator validates names, the runtime builds."""

MAX_TILES_PER_SIDE = 16
"""Most tile columns or rows of a tiled frame (16x16 = 256 tasks a frame): beyond that the per-task
overhead (lease, upload, about 0.03 s of render set-up per tile) outweighs any gain in width."""

MAX_TILE_OVERSCAN = 256
"""Largest overscan margin a job may ask for, in pixels."""

VIDEO_CRF = 20
"""H.264 constant rate factor of ``--video`` encodes (x264: 18 visually lossless, 23 its default)."""

BENCH_WORK_UNITS = 100.0
"""Work units in one benchmark frame (and one benchmark image). A worker's score is BENCH_WORK_UNITS ÷ the
seconds it takes, in work units a second: the unit in which work is metered and paid, like OctaneBench."""


MAX_BLEND_BYTES = int(_env_float("MAX_BLEND_BYTES", 16 * 1024**3))
"""Largest .blend a worker loads, decompressed (a worker also stops at half its runtime's memory limit): a
1.9 MB zstd file can expand to 5 GB inside Blender, so the decompressed size is counted before opening."""


SAFE_RECURSION_LIMIT = 12 * 1024
"""The interpreter's recursion limit in a process that parses strangers' JSON. py-ecc (imported with the
embedded EVM) raises it to 100,000 at import, and then a 100 KB body of nested ``[`` makes the C JSON
decoder overflow the 8 MiB stack: the process dies of SIGSEGV (measured). At this limit (py-evm's own
need: 1,024 EVM call frames) the decoder raises RecursionError instead, in the main thread and in worker
threads alike, and the request is refused with a 4xx."""


def cap_recursion(limit: int = SAFE_RECURSION_LIMIT) -> int:
    """Lower the recursion limit to ``limit`` if something raised it past that; returns the limit now."""
    import sys
    if sys.getrecursionlimit() > limit:
        sys.setrecursionlimit(limit)
    return sys.getrecursionlimit()


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string, escapes included


def json_nesting(raw: bytes, limit: int) -> int:
    """How deep ``raw``'s JSON arrays and objects nest, counted up to ``limit + 1`` (strings skipped): to
    refuse deep nesting before ``json.loads`` sees it, whatever the recursion limit is. Linear in ``raw``."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0 if not raw else min(limit, raw.count(b"[") + raw.count(b"{"))
    brackets = _JSON_STRING.sub(b"", raw).translate(None, bytes(set(range(256)) - set(b"[]{}")))
    depth = deepest = 0
    for b in brackets:
        depth += 1 if b in (0x5B, 0x7B) else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest

RENDER_PASSES = ("depth", "normal", "mask")
"""Render passes a render job may ask for (``passes``), written next to each frame as ``depth_0001.png``…:
depth (near white, far black), normal (camera space as RGB), mask (geometry white): see
worker/runtimes/render_passes.py."""


def pass_output(name: str, frame: int) -> str:
    """The output name of render pass ``name`` of ``frame``."""
    return f"{name}_{frame:04d}.png"


def is_pass_output(name: str) -> bool:
    """Whether an output name is a render pass (not a frame, a tile or an image)."""
    return name.split("_", 1)[0] in RENDER_PASSES
