"""Log set-up shared by ``farm serve`` and ``farm worker``: plain lines for people, or one JSON object a
line for log shippers (``RENDERHIVE_LOG_FORMAT=json``). Either way a record's job, task, attempt and
worker (passed as ``extra=ctx(...)``) are fields of their own, so one task's story can be grepped or
queried across the coordinator's and the workers' logs."""
from __future__ import annotations

import json
import logging
import os
import time

FIELDS = ("job", "task", "attempt", "worker")


def ctx(job=None, task=None, attempt=None, worker=None) -> dict:
    """``extra=`` for a log call about one job/task/attempt/worker (None fields are left out)."""
    return {k: v for k, v in zip(FIELDS, (job, task, attempt, worker)) if v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 6), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
               "pid": record.process}
        doc.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        return f"{line} [{tags}]" if tags else line


def setup() -> None:
    """Configure the root logger from RENDERHIVE_LOG (level) and RENDERHIVE_LOG_FORMAT (text | json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if os.environ.get("RENDERHIVE_LOG_FORMAT") == "json" else TextFormatter())
    logging.basicConfig(level=os.environ.get("RENDERHIVE_LOG", "INFO"), handlers=[handler], force=True)
