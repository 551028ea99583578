"""Every tunable number of the farm, in one place, each with the reason it has its value.

Worker and coordinator import these; tests shrink some of them through environment variables
(``RENDERHIVE_<NAME>``) so that failure paths run in seconds instead of minutes.
"""
from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(f"RENDERHIVE_{name}")
    return float(raw) if raw else default


PROTOCOL_HEADER = b"RHIVE/1"
"""First frame of every ZeroMQ message. A peer speaking another version is answered with ERROR."""

HEARTBEAT_INTERVAL = _env_float("HEARTBEAT_INTERVAL", 1.0)
"""Seconds between heartbeats, sent both ways, also while a worker renders (the render runs in a child)."""

HEARTBEAT_LIVENESS = 3
"""Missed heartbeat intervals after which the peer is presumed dead (Paranoid Pirate, RFC 6)."""

RECONNECT_INITIAL = 1.0
"""First reconnect delay of a worker that lost the coordinator, in seconds."""

RECONNECT_MAX = 32.0
"""Cap of the exponential reconnect backoff (1 → 2 → 4 … → 32 s)."""

LEASE_SECONDS = _env_float("LEASE_SECONDS", 30.0)
"""Length of a task lease. Every heartbeat that lists the task renews it, so a live worker never loses a
lease to a long frame; a coordinator that restarts waits at most this long for silent workers."""

SWEEP_INTERVAL = 0.5
"""Seconds between sweeps for dead workers and expired leases."""

CURVE_REFUSAL_LOG_INTERVAL = 30.0
"""A refused worker key is logged at most once per this many seconds (a refused peer retries, and
libzmq retries a failed handshake by itself every 100 ms)."""

TASK_MAX_ATTEMPTS = 5
"""Attempts after which a task that keeps failing (retryable failures, lost leases) is failed for good."""

TASK_DISTINCT_WORKER_FAILURES = 3
"""A task failed by this many distinct workers fails: the scene, not the worker, is the problem."""

JOB_WORKER_FAILURE_LIMIT = 3
"""A worker that fails this many tasks of one job is blocklisted for that job."""

JOB_MAX_FAILED_FRACTION = 0.0
"""A job fails once more than this fraction of its tasks has failed (0: the first failed task fails it;
a partial frame sequence is of no use to an artist, and failing fast saves their deposit)."""

BLOB_CHUNK_SIZE = 256 * 1024
"""Bytes per blob chunk on the worker plane."""

BLOB_CREDIT = 8
"""Chunks a peer may have in flight (credit-based flow control, zguide file transfer model 3)."""

BLOB_TRANSFER_TIMEOUT = 5.0
"""Seconds without a chunk after which a transfer re-requests from its last verified offset."""

MAX_UPLOAD_BYTES = int(_env_float("MAX_UPLOAD_BYTES", 4 * 1024**3))
"""Largest blob accepted from a creator or a worker."""

MAX_MESSAGE_BYTES = BLOB_CHUNK_SIZE + 64 * 1024
"""Largest body frame a decoder accepts; anything larger is malformed."""

MAX_RESOLUTION = 16384
"""Largest render width or height a worker accepts from an untrusted scene."""

MAX_SAMPLES = 65536
"""Largest Cycles sample count a worker accepts."""

MAX_FRAMES_PER_JOB = 100_000
"""Largest number of frames in one job."""

WORKER_CACHE_BYTES = int(_env_float("WORKER_CACHE_BYTES", 20 * 1024**3))
"""Default size cap of a worker's blob cache (LRU)."""

RUNTIME_MAX_RSS_BYTES = int(_env_float("RUNTIME_MAX_RSS_BYTES", 16 * 1024**3))
"""A runtime child whose resident memory exceeds this after a task is restarted before the next one
(Blender and torch can fragment or leak over many scenes; a restart costs about a second)."""

BATCH_MAX_MESSAGES = 512
"""Messages the coordinator handles per step: one transaction, one commit, then all replies."""

# ------------------------------------------------------------------ Stable Diffusion jobs
MAX_DIFFUSION_IMAGES = 4096
"""Most images in one diffusion job (prompts × count, or source frames): at about 2 s an image on one GPU
that is over two hours of work; a bigger batch is better split into jobs that can be reviewed one by one."""

MAX_DIFFUSION_SIDE = 2048
"""Largest image width or height (pixels, a multiple of 8): SD 1.x/2.x models are trained at 512-768 and
memory grows with the square of the side."""

MAX_DIFFUSION_STEPS = 500
"""Most denoising steps a job may ask for (samplers converge in 20-50)."""

MAX_DIFFUSION_PER_TASK = 16
"""Largest micro-batch (images per task): bigger batches gain little throughput and lose more work when a
worker dies mid-task."""

DIFFUSION_SCHEDULERS = {
    "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
}
"""Scheduler names a diffusion job may ask for → diffusers class, built from the model's own scheduler
config ("default": the model's scheduler as saved). The coordinator validates names, the runtime builds."""

DIFFUSION_CACHE_BYTES = int(_env_float("DIFFUSION_CACHE_BYTES", 0))
"""Memory for loaded pipelines in one diffusion runtime (LRU by model); 0: 70% of the GPU's memory on
CUDA, 40% of RAM on the CPU. The pipeline in use is always kept, even when it alone is bigger."""

# ------------------------------------------------------------------ reputation and verification
REP_HALF_LIFE = _env_float("REP_HALF_LIFE", 14 * 86400.0)
"""Seconds after which a piece of reputation evidence counts half: recent behaviour weighs more, and an
old failure is forgiven over weeks, not hours."""

REP_WEIGHTS = {
    "check_passed": (1.0, 0.0), "probe_passed": (1.0, 0.0), "vouched": (20.0, 0.0),
    "check_failed": (0.0, 10.0), "probe_failed": (0.0, 10.0), "invalid_result": (0.0, 1.0),
    "overclaimed": (0.0, 4.0), "failure": (0.0, 0.25), "lease_lost": (0.0, 0.25),
}
"""(good, bad) evidence each event adds to a worker's Beta(1 + good, 1 + bad) reputation. A failed check
weighs ten passed ones: one caught cheat drops a new worker from 0.5 to 0.09 and a worker with 20 passes
from 0.95 to 0.66 (out of "top"); an invalid result (a file that is no picture, a missing output) costs
one, so a second one in a row puts a new worker on probation; crashes and lost leases cost little (flaky
is not dishonest)."""

REP_FLOOR = _env_float("REP_FLOOR", 0.3)
"""Below this reputation a worker gets no work, only probes (checks of results already verified), until
passed probes lift it back over the floor."""

TIER_TRUSTED = (0.75, 3.0)
"""(minimum reputation, minimum decayed passed checks) of the "trusted" tier."""

TIER_TOP = (0.9, 20.0)
"""(minimum reputation, minimum decayed passed checks) of the "top" tier."""

TIERS = ("probation", "new", "trusted", "top")
"""Tiers from worst to best. A job may ask for a minimum tier (``min_tier``)."""

CHECK_RATE = {"probation": 1.0, "new": 1.0,
              "trusted": _env_float("CHECK_RATE_TRUSTED", 0.1), "top": _env_float("CHECK_RATE_TOP", 0.03)}
"""Fraction of a worker's results that are spot-checked, by tier. Every result of a new worker is checked
(AI Horde checks untrusted workers the same way), so a cheater is caught on its first result."""

CHECK_FULL_WHILE_NEW = True
"""Checks of a new worker's results re-render the whole frame: k small crops would miss a small region
painted over. From "trusted" on, checks are CHECK_CROPS crops of CHECK_CROP_FRACTION of the frame each."""

CHECK_CROPS = 3
"""Crops re-rendered per spot check (Golem re-renders 3 per result)."""

CHECK_CROP_FRACTION = 0.03
"""Area of each crop as a fraction of the frame (a few per cent: the crops cost about 3 × 3 % of a frame)."""

CHECK_SSIM_MIN = _env_float("CHECK_SSIM_MIN", 0.98)
"""Across device types (a CPU and a GPU render differ in float rounding), a crop passes with a mean SSIM
of at least this; between like devices the pixels must be equal. See farm/compare.py for the calibration."""

CHECK_WAIT = _env_float("CHECK_WAIT", 20.0)
"""Seconds a check may wait in the queue with no connected worker able to run it (the checked worker is
the only one left) before the result is accepted unverified: a lone worker still finishes the job."""

CHECK_SSIM_WINDOW_MIN = _env_float("CHECK_SSIM_WINDOW_MIN", 0.5)
"""Across device types, no 7×7 window of a region may have an SSIM below this: a small region painted over
keeps the mean SSIM at 0.95-0.99 (bench/verify.py) but its windows fall to about 0."""

CHECK_BLOCKLIST_AFTER = 2
"""Failed checks within one job after which the worker is blocklisted for the job."""

PROBE_BACKOFF = _env_float("PROBE_BACKOFF", 30.0)
"""Seconds between probes of a worker on probation (doubling after each failed probe, up to 1 hour)."""

SPEED_EWMA = 0.2
"""Weight of a new measurement in a worker's measured speed (work units a second)."""

SPEED_OVERCLAIM = 2.0
"""A worker whose benchmark claims more than this times its measured speed is caught overclaiming."""

# ------------------------------------------------------------------ tiles and video (Blender jobs)
MAX_TILES_PER_SIDE = 16
"""Most tile columns or rows of a tiled frame (16x16 = 256 tasks a frame): beyond that the per-task
overhead (lease, upload, about 0.03 s of render set-up per tile) outweighs any gain in width."""

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

MAX_TILE_OVERSCAN = 256
"""Largest overscan margin a job may ask for, in pixels."""

RENDER_THREADS = int(_env_float("RENDER_THREADS", 0))
"""Render threads of each Blender child (0: Blender's automatic choice, all cores). Set it when several
workers share one host, e.g. to measure how tiles of one frame spread over workers."""

VIDEO_CRF = 20
"""H.264 constant rate factor of ``--video`` encodes (x264: 18 visually lossless, 23 its default)."""

VIDEO_DEFAULT_FPS = 24.0
"""Frame rate of a video whose frames carry no scene frame rate (see the Blender runtime's fps note)."""

DIFFUSION_THREADS = int(_env_float("DIFFUSION_THREADS", 0))
"""CPU threads of each diffusion runtime (``torch.set_num_threads``); 0: torch's default, every core. On a
CPU worker with several slots, or a host shared with other work, give cores ÷ slots: torch's OpenMP threads
spin-wait for each other, and one that loses its core slows a step down many times over."""

# ------------------------------------------------------------------ worker benchmark (worker.benchmark)
BENCH_WORK_UNITS = 100.0
"""Work units in one benchmark frame (and one benchmark image). A worker's score is BENCH_WORK_UNITS ÷ the
seconds it takes, in work units a second: the unit in which work is metered and paid, like OctaneBench."""

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
