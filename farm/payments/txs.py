"""The ledger's transaction journal: every chain transaction is signed, persisted, then broadcast.

Invariants (the ledger's, see farm/payments/ledger.py):

* a transaction is stored as signed bytes (a ChainTx row, committed) before it is broadcast, and is
  re-broadcast, never re-signed, while unresolved: a crash between the two loses nothing and never
  spends a nonce twice;
* one transaction at a time (``lock``, re-entrant): nonces never collide, and no new transaction is
  signed while one is unresolved (the ledger checks :meth:`TxJournal.resolve_pending` first);
* a transaction whose nonce went to another can never mine: it is marked dropped, and the next pass
  decides again from the escrow's state.

Test seams: ``seam(kind, stage)`` is called after a transaction is "signed" and "sent";
``RENDERHIVE_LEDGER_CRASH_AFTER=kind:stage`` makes the process exit there (a kill -9 in the middle).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from sqlmodel import Session, select

from farm.payments import chain as ch
from farm.store.db import session as new_session
from farm.store.ledger_models import ChainTx, Settlement, TxStatus

log = logging.getLogger("farm.payments.ledger")

UNRESOLVED = (TxStatus.signed.value, TxStatus.sent.value)


class TxJournal:
    def __init__(self, engine, tx_wait: float = 5.0):
        self.engine = engine
        self.tx_wait = tx_wait  # how long a send waits for its receipt before the next pass looks again
        self.lock = threading.RLock()
        self.seam: Callable[[str, str], None] | None = None
        self._crash_after = os.environ.get("RENDERHIVE_LEDGER_CRASH_AFTER", "")

    def _seam_point(self, kind: str, stage: str) -> None:
        if self.seam:
            self.seam(kind, stage)
        if self._crash_after == f"{kind}:{stage}":
            log.warning("RENDERHIVE_LEDGER_CRASH_AFTER=%s: exiting now (test seam)", self._crash_after)
            os._exit(86)

    def send(self, chain: ch.Chain, epoch: int, s: Session, job_id: int | None, kind: str, key: str, call=None, *,
             to: str | None = None, value: int = 0, detail: str = "") -> ChainTx:
        """Sign, persist, broadcast, and briefly wait for the receipt of one transaction."""
        with self.lock:
            signed = chain.sign(key, call, to=to, value=value)
            row = ChainTx(epoch=epoch, job_id=job_id, kind=kind, sender=signed.sender, nonce=signed.nonce,
                          tx_hash=signed.tx_hash, raw=signed.raw, detail=detail[:500])
            s.add(row)
            st = s.get(Settlement, job_id) if job_id is not None else None
            if st is not None and st.error:  # the step that was refused before goes through now
                st.error = ""
                s.add(st)
            s.commit()
            self._seam_point(kind, "signed")
            chain.broadcast(signed)
            row.status, row.updated_at = TxStatus.sent.value, time.time()
            s.add(row)
            s.commit()
            self._seam_point(kind, "sent")
            self.await_receipt(chain, s, row, self.tx_wait)
            log.info("tx %s %s job=%s nonce=%d %s", kind, row.tx_hash, job_id, row.nonce, row.status)
            return row

    def await_receipt(self, chain: ch.Chain, s: Session, row: ChainTx, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``row``'s receipt and record it (mined or reverted); whether it came."""
        deadline, delay = time.monotonic() + timeout, 0.02
        while True:
            rcpt = chain.receipt(row.tx_hash)
            if rcpt is not None:
                row.status = (TxStatus.mined if rcpt.ok else TxStatus.reverted).value
                row.block, row.gas_used, row.updated_at = rcpt.block, rcpt.gas_used, time.time()
                if not rcpt.ok:
                    row.error = "reverted on chain"
                    log.warning("tx %s (%s, job %s) reverted", row.tx_hash, row.kind, row.job_id)
                s.add(row)
                s.commit()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def resolve_pending(self, chain: ch.Chain) -> int:
        """Settle the fate of transactions sent (or only signed) earlier; returns how many are in flight."""
        pending = 0
        with new_session(self.engine) as s:
            for row in s.exec(select(ChainTx).where(ChainTx.status.in_(UNRESOLVED)).order_by(ChainTx.id)).all():
                if self.await_receipt(chain, s, row, 0):
                    continue
                if not chain.knows(row.tx_hash):
                    try:  # never reached the node (crash before broadcast, node restarted without it)
                        chain.broadcast(ch.SignedTx(row.sender, row.nonce, row.tx_hash, row.raw))
                    except ch.TxRejected as exc:  # its nonce went to another transaction: it can never mine
                        row.status, row.error = TxStatus.dropped.value, str(exc)[:500]
                        s.add(row)
                        s.commit()
                        continue
                    row.status = TxStatus.sent.value
                    s.add(row)
                    s.commit()
                if not self.await_receipt(chain, s, row, self.tx_wait):
                    pending += 1
        return pending
