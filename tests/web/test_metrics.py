"""/metrics and structured logs against a real `farm serve` with two real workers rendering a job."""
from __future__ import annotations

import json
import re
import urllib.request

from tests.conftest import TEST_SETTINGS, submit_sample, wait_job, wait_workers


def scrape(url: str, token: str | None = None) -> dict[str, float]:
    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert re.search(r"^# TYPE renderhive_results_total counter$", text, re.M)
    return samples


def test_metrics_and_json_logs_follow_a_job(farm, worker):
    f = farm({"RENDERHIVE_LOG_FORMAT": "json", "RENDERHIVE_LOG": "DEBUG"})
    alice = f.creator("alice")
    before = scrape(f.url)
    assert before["renderhive_results_total"] == 0 and before["renderhive_queue_depth"] == 0
    w1, w2 = worker(f, "w1"), worker(f, "w2")
    wait_workers(alice, 2)
    job = submit_sample(alice, "1-4", **TEST_SETTINGS)
    assert wait_job(alice, job["id"])["status"] == "rendered"
    m = scrape(f.url)
    assert m['renderhive_tasks{status="accepted",kind="render",check="false"}'] == 4
    assert m['renderhive_jobs{status="rendered"}'] == 1
    # two new workers check each other: every result is re-rendered once, and they agree
    assert m["renderhive_results_total"] == 4 + m['renderhive_checks{status="passed"}']
    assert m['renderhive_checks{status="passed"}'] >= 4 and 'renderhive_checks{status="failed"}' not in m
    assert sum(v for k, v in m.items() if k.startswith("renderhive_workers{") and 'online="true"' in k) == 2
    assert m["renderhive_settlement_lag_seconds"] == 0
    # every coordinator log line is one JSON object; task lines carry job, task, attempt and worker
    lines = [json.loads(x) for x in f.log.read_text().splitlines() if x.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    leased = [x for x in lines if x["msg"].startswith("leased render")]
    assert {x["job"] for x in leased} == {job["id"]} and {x["worker"] for x in leased} <= {"w1", "w2"}
    assert all(isinstance(x["task"], int) and x["attempt"] >= 1 for x in leased)


def test_metrics_token(farm):
    f = farm({"RENDERHIVE_METRICS_TOKEN": "s3cret"})
    try:
        scrape(f.url)
        raise AssertionError("metrics served without the token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401 and "RENDERHIVE_METRICS_TOKEN" in exc.read().decode()
    assert scrape(f.url, "s3cret")["renderhive_queue_depth"] == 0
