"""Workers: the list with their standing, each one's reputation history, and (admin) the CurveZMQ
allow-list and revocations, which drop a revoked key's connections and requeue its leases at once.
"""
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from sqlmodel import select

from common.keys import is_key
from farm.store.models import ReputationEvent, User, Worker
from farm.verify import reputation
from farm.web.deps import Api
from farm.web.schemas import WorkerKeyRequest


def worker_router(api: Api) -> APIRouter:
    r = APIRouter()
    broker = api.broker
    SessionDep, UserDep = api.SessionDep, api.UserDep

    @r.get("/api/workers")
    def list_workers(user: UserDep, s: SessionDep) -> list[dict[str, Any]]:
        keys = dict(broker.keyring.bindings) if broker is not None and broker.keyring is not None else {}
        return [{"id": w.id, "online": w.online, "hostname": w.hostname, "slots": w.slots,
                 "wallet": w.wallet, "devices": w.capabilities.get("devices", []),
                 "tasks_done": w.tasks_done, "tasks_failed": w.tasks_failed,
                 "render_seconds": round(w.render_seconds, 3), "last_seen": w.last_seen,
                 "benchmark": w.benchmark, "public_key": keys.get(w.id, ""), **reputation.view(w)}
                for w in s.exec(select(Worker).order_by(Worker.id))]

    def admin_keyring(user: User):
        if not user.is_admin:
            raise HTTPException(403, "only the admin manages worker keys (use the token in DATA/admin.token)")
        if broker is None or broker.keyring is None:
            raise HTTPException(409, "this coordinator has no CurveZMQ keyring (an in-process test farm)")
        return broker.keyring

    @r.post("/api/workers/allow")
    async def allow_worker(body: WorkerKeyRequest, user: UserDep) -> dict[str, Any]:  # async: the keyring's thread
        """Put a worker's public key on the allow-list (and off the revocations): in allowlist and token
        mode such a key is admitted (`farm worker --print-key` shows a worker's key)."""
        keyring = admin_keyring(user)
        if not is_key(body.worker):
            raise HTTPException(422, f"{body.worker[:60]!r} is not a Z85 public key (40 characters): "
                                     "`farm worker --print-key --cache DIR` prints a worker's key")
        added = keyring.allow(body.worker, "allowed by the admin")
        return {"key": body.worker, "added": added, "mode": keyring.mode}

    @r.post("/api/workers/revoke")
    async def revoke_worker(body: WorkerKeyRequest, user: UserDep) -> dict[str, Any]:
        """Revoke a worker's key (or the key a worker id belongs to): refused from now on in every mode;
        its connections are dropped and their leases requeued at once."""
        keyring = admin_keyring(user)
        key = keyring.bindings.get(body.worker) or (body.worker if is_key(body.worker) else None)
        if key is None:
            raise HTTPException(404, f"no worker id or key {body.worker[:60]!r}: `farm workers` lists ids and keys")
        done = await broker.revoke(key, "this worker's key was revoked by the farm's operator")
        return {"key": key, **done}

    @r.get("/api/workers/{worker_id}/reputation")
    def worker_reputation(worker_id: str, user: UserDep, s: SessionDep,
                          limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """A worker's standing and the evidence behind it, newest first."""
        w = s.get(Worker, worker_id)
        if w is None:
            raise HTTPException(404, f"no worker {worker_id!r}: `farm workers` lists them")
        events = s.exec(select(ReputationEvent).where(ReputationEvent.worker_id == worker_id)
                        .order_by(ReputationEvent.id.desc()).limit(limit)).all()
        return {"id": w.id, **reputation.view(w),
                "history": [{"at": e.at, "kind": e.kind, "good": e.good, "bad": e.bad, "score": e.score,
                             "tier": e.tier, "job_id": e.job_id, "task_id": e.task_id, "detail": e.detail}
                            for e in events]}

    return r
