"""The coordinator's policy numbers, in one place, each with the reason it has its value: leases and
sweeps, retries and failure limits, batching, diffusion job caps, reputation, tiers and spot checks.

Limits the worker must agree on (heartbeats, blob chunks, message and upload sizes, render caps) are in
:mod:`common.limits`. Tests shrink some of these through environment variables (``RENDERHIVE_<NAME>``)
so that failure paths run in seconds instead of minutes.
"""
from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(f"RENDERHIVE_{name}")
    return float(raw) if raw else default


LEASE_STALL_SECONDS = _env_float("LEASE_STALL_SECONDS", 3600.0)
"""Leases need progress: a lease whose task has shown no progress (a frame, an image, its inputs fetched)
for this long is no longer renewed by heartbeats, so it runs out and the task goes to another worker. Used
while the job has no measured frame yet; once it has, the limit is LEASE_STALL_FACTOR × its median frame
(coordinator-timed, at least LEASE_STALL_MIN), and a job's own ``time_limit`` a frame when it sets one."""

LEASE_STALL_FACTOR = 4.0
"""How many times the job's median measured frame a task may go without progress (frames of one job cost
about the same; 4× leaves room for a slower worker and a heavier frame; set ``time_limit`` for a job whose
frames vary more)."""

LEASE_STALL_MIN = _env_float("LEASE_STALL_MIN", 60.0)
"""Least time without progress after which a lease is taken back (short frames: a slow fetch or a GC
pause is not a stall)."""

LEASE_SECONDS = _env_float("LEASE_SECONDS", 30.0)
"""Length of a task lease. Every heartbeat that lists the task renews it, so a live worker never loses a
lease to a long frame; a coordinator that restarts waits at most this long for silent workers."""

SWEEP_INTERVAL = 0.5
"""Seconds between sweeps for dead workers and expired leases."""

CURVE_REFUSAL_LOG_INTERVAL = 30.0

MAX_WORKER_IDS_PER_KEY = int(_env_float("MAX_WORKER_IDS_PER_KEY", 16))
"""Worker ids one CURVE key may claim (each becomes a Worker row): a multi-GPU host runs a few daemons."""

HANDSHAKES_PER_MINUTE = _env_float("HANDSHAKES_PER_MINUTE", 120)
HANDSHAKE_BURST = _env_float("HANDSHAKE_BURST", 240)
"""CURVE handshakes one address may start (a worker reconnects after each outage; a flood of throw-away
keys from one host is refused at the handshake, before it holds a connection the coordinator sees)."""
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

MAX_FRAMES_PER_JOB = 100_000
"""Largest number of frames in one job."""

MAX_TASKS_PER_JOB = int(_env_float("MAX_TASKS_PER_JOB", 20_000))
"""Most tasks one job may have (frames ÷ chunk × tiles, images ÷ micro-batch, plus assembly and encode):
creating one writes a row each in one transaction, and frames 1-100000 one a task took about a minute and
locked the database. Bigger work is split into jobs, or chunked (``--chunk``)."""

MAX_ACTIVE_TASKS_PER_CREATOR = int(_env_float("MAX_ACTIVE_TASKS_PER_CREATOR", 100_000))
"""Most unfinished tasks one creator may have queued across their jobs (one creator cannot fill the queue)."""

# ---- reviews: a creator rejects frames to have them re-rendered, unpaid; bounded, or it is a free render
MAX_REJECT_ROUNDS_PER_JOB = int(_env_float("MAX_REJECT_ROUNDS_PER_JOB", 2))
"""Times a rendered job may be sent back for re-rendering; after that it is approved or disputed by the operator."""

MAX_JOB_REJECT_SHARE = _env_float("MAX_JOB_REJECT_SHARE", 0.5)
"""Most of a job's frames (a share of its tasks, counting every round) that its creator may reject."""

MAX_CREATOR_REJECT_RATE = _env_float("MAX_CREATOR_REJECT_RATE", 0.25)
"""Most of all the frames delivered to a creator that they may have rejected (their standing)."""

REJECT_GRACE_FRAMES = int(_env_float("REJECT_GRACE_FRAMES", 8))
"""Rejected frames a creator may always have, whatever their rate (a new creator's first test job)."""

PEER_SEND_QUEUE = int(_env_float("PEER_SEND_QUEUE", 128))
"""Messages queued for one worker that has not read them (ZeroMQ's per-peer SNDHWM); a peer whose queue
stays full for the liveness time is dropped (it reads nothing). The bytes of BLOB chunks among them are
bounded by PEER_SEND_BYTES: a count alone would let 128 × a 1 MiB chunk wait for one peer."""

PEER_SEND_BYTES = int(_env_float("PEER_SEND_BYTES", 32 * 1024**2))
"""Bytes of BLOB chunks queued for one worker and not yet taken by ZeroMQ's I/O thread (the broker counts
them: farm.plane.broker): past this its chunks are not sent and it is congested, as with a full queue. An
honest worker has its credit in flight (4 MiB a blob), far below this."""

BLOB_GETS_PER_STEP = int(_env_float("BLOB_GETS_PER_STEP", 16))
"""BLOB_GETs served per connection in one step: a worker keeps BLOB_CREDIT (4) in flight per blob, a few
blobs at once with prefetch; a flood past this is not read from disk or answered."""

CANCEL_BATCH = int(_env_float("CANCEL_BATCH", 2000))
"""Tasks of a canceled job moved to ``canceled`` at once (two statements); the rest by the next sweeps."""

UPLOADS_PER_CONNECTION = int(_env_float("UPLOADS_PER_CONNECTION", 64))
"""Unfinished uploads (partial files) one worker connection may have: a task's outputs, several tasks'."""

BATCH_MAX_MESSAGES = 512
"""Messages the coordinator handles per step: one transaction, one commit, then all replies."""

BACKLOG_GRACE = _env_float("BACKLOG_GRACE", 30.0)
"""Seconds of a backlog (steps with full batches: the queue holds more than a step reads) that do not count
as a worker's silence: its heartbeats may be waiting unread behind the backlog, as when a thousand workers
reconnect to a restarted coordinator at once. Past it, silence counts again, so a flood cannot keep dead
peers connected for ever."""

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
of at least this; between like devices the pixels must be equal. See farm/verify/compare.py for the calibration."""

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

RELEASES_PER_JOB = 4
"""Tasks of one job a worker may hand back (RELEASE: its owner paused it) before it takes none of that job's
tasks any more. A release costs the task nothing, so this bounds the churn strangers can make with them."""
