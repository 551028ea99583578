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
