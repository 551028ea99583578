"""Prometheus metrics at ``/metrics`` (text exposition format 0.0.4, no client library needed).

Counters come from the coordinator's in-memory ``stats`` (reset by a restart, as Prometheus counters may
be: ``rate()`` handles resets); gauges are read from the database on each scrape (a few indexed COUNT
queries). Scrape it every 15-60 s; it never touches the coordinator's thread.

=====================================  ==========================================================
renderhive_tasks{status,kind,check}    tasks by status (gauge; check="true": spot-check re-renders)
renderhive_queue_depth                 tasks waiting for a worker (gauge)
renderhive_jobs{status}                jobs by status (gauge)
renderhive_results_total               results accepted for storage (counter; tasks/s = rate())
renderhive_lease_expiries_total        leases lost: expired, or the worker died (counter)
renderhive_stale_messages_total        fenced-off messages from old attempts (counter)
renderhive_malformed_messages_total    messages that failed to decode (counter)
renderhive_blob_chunks_sent_total      blob chunks served to workers (counter)
renderhive_sealed_bytes_total          bytes of big blobs sealed once for the sealed channel (counter)
renderhive_sealed_bytes_sent_total     sealed bytes sent to workers by sendfile (counter)
renderhive_workers{tier,online}        workers by reputation tier, connected or not (gauge)
renderhive_checks{status}              spot checks by outcome; failures are status="failed" (gauge)
renderhive_settlement_lag_seconds      age of the oldest approved job not paid yet (0: none)
renderhive_settlements{status}         escrows by status (gauge)
=====================================  ==========================================================
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from sqlalchemy import func
from sqlmodel import Session, select

from farm.store.ledger_models import Settlement
from farm.store.models import Check, Job, Task, Worker

COUNTERS = {  # coordinator.stats key → (metric name, help)
    "results": ("renderhive_results_total", "Task results accepted for storage."),
    "lost": ("renderhive_lease_expiries_total", "Leases lost (expired, or the worker died or reconnected)."),
    "stale": ("renderhive_stale_messages_total", "Messages about attempts that are no longer current."),
    "malformed": ("renderhive_malformed_messages_total", "Worker messages that failed to decode."),
    "chunks_out": ("renderhive_blob_chunks_sent_total", "Blob chunks served to workers."),
    "sealed_bytes": ("renderhive_sealed_bytes_total", "Bytes of big blobs sealed for the sealed channel."),
    "bytes_sent": ("renderhive_sealed_bytes_sent_total", "Sealed bytes sent to workers by the sealed channel."),
}


def _escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """A sample's value, exact: ``:g`` keeps 6 digits, so a byte counter of 8,685,844 read 8.68584e+06."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family(name: str, kind: str, help_: str, samples: Iterable[tuple[dict[str, Any], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        num = _number(value)
        lines.append(f"{name}{{{lab}}} {num}" if lab else f"{name} {num}")
    return lines


def render(s: Session, stats: dict[str, int] | None, now: float | None = None) -> str:
    """The metrics page."""
    now = time.time() if now is None else now
    out: list[str] = []
    check = Task.check_id.is_not(None).label("check")
    tasks = s.exec(select(Task.status, Task.kind, check, func.count()).group_by(Task.status, Task.kind, check)).all()
    out += _family("renderhive_tasks", "gauge", "Tasks by status and kind; check=true: spot-check re-renders "
                   "(queued = queue depth).",
                   [({"status": st, "kind": k, "check": str(bool(c)).lower()}, n) for st, k, c, n in tasks])
    queued = sum(n for st, _, _, n in tasks if st == "queued")
    out += _family("renderhive_queue_depth", "gauge", "Tasks waiting for a worker.", [({}, queued)])
    jobs = s.exec(select(Job.status, func.count()).group_by(Job.status)).all()
    out += _family("renderhive_jobs", "gauge", "Jobs by status.", [({"status": st}, n) for st, n in jobs])
    for key, (name, help_) in COUNTERS.items():
        out += _family(name, "counter", help_, [({}, (stats or {}).get(key, 0))])
    workers = s.exec(select(Worker.tier, Worker.online, func.count()).group_by(Worker.tier, Worker.online)).all()
    out += _family("renderhive_workers", "gauge", "Workers by reputation tier and connection.",
                   [({"tier": t, "online": str(bool(o)).lower()}, n) for t, o, n in workers])
    checks = s.exec(select(Check.status, func.count()).group_by(Check.status)).all()
    out += _family("renderhive_checks", "gauge", "Spot checks by outcome (failed: a result that did not "
                   "match its re-render).", [({"status": st}, n) for st, n in checks])
    oldest = s.exec(select(func.min(Job.updated_at)).where(Job.status == "approved")).one()
    out += _family("renderhive_settlement_lag_seconds", "gauge", "Age of the oldest approved job not paid yet.",
                   [({}, max(0.0, now - oldest) if oldest else 0.0)])
    rows = s.exec(select(Settlement.status, func.count()).group_by(Settlement.status)).all()
    out += _family("renderhive_settlements", "gauge", "Escrows by status.", [({"status": st}, n) for st, n in rows])
    return "\n".join(out) + "\n"
