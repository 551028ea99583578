"""Fuzzing the HTTP API with schemathesis: every operation of the app's OpenAPI schema, valid and invalid
inputs, in process through ASGI, on a real SQLite file and blob store, as a real creator (bearer token).

Checks: no 500 ever (a server error is a bug; the app's error handlers answer bad input with 4xx and a
message), and every response conforms to the schema where the schema documents it. Examples are
derandomized (same inputs every run) and bounded so the file runs in well under 90 s on two cores.
The event streams of unfinished jobs never end, so the fixture's jobs are all finished (rendered,
approved, canceled) and POST /api/jobs cannot create one in the same test as GET .../events.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from common import protocol as P
from farm.store.blobs import BlobStore
from farm.web.app import create_app
from tests.fixtures_inproc import (
    SCENE_BYTES,
    Driver,
    make_engine_and_store,
    make_user,
    new_coordinator,
    of,
    output_blob,
    sha256,
)

MAX_EXAMPLES = int(os.environ.get("FUZZ_API_EXAMPLES", "40"))
"""Examples per operation (about 20 s for the file on two cores); set FUZZ_API_EXAMPLES=500 for a long hunt."""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _finish(engine, blobs, job_id: int) -> None:
    """Lease the job's tasks to a worker and hand in a RESULT for each (real Coordinator.step)."""
    d = Driver(new_coordinator(engine, blobs))
    d.hello(b"fz", slots=8)
    for t in of(d.send((b"fz", P.Ready(8))), P.Task):
        outs = [output_blob(blobs, f, "fuzz") for f in t.spec["frames"]]
        assert of(d.send((b"fz", P.Result(t.task_id, t.attempt, outs, 1.0))), P.Ack)[0].accepted


@pytest.fixture
def api_schema(tmp_path):
    engine, blobs = make_engine_and_store(tmp_path / "farm")
    _, admin = make_user(engine, "admin", admin=True)
    app = create_app(engine, blobs)
    with TestClient(app) as http:
        alice = http.post("/api/users", json={"name": "alice"}, headers=bearer(admin)).json()["token"]
        scene = sha256(SCENE_BYTES)
        assert http.put(f"/api/blobs/{scene}", content=SCENE_BYTES, headers=bearer(alice)).status_code == 201
        ids = []
        for frames in ("1-2", "3", "4"):
            r = http.post("/api/jobs", json={"scene_sha256": scene, "frames": frames}, headers=bearer(alice))
            ids.append(r.json()["id"])
            _finish(engine, blobs, ids[-1])  # jobs 1-3 rendered
        assert http.post(f"/api/jobs/{ids[0]}/approve", headers=bearer(alice)).status_code == 200
        assert http.post(f"/api/jobs/{ids[2]}/reject", json={"frames": "4", "reason": "x"},
                         headers=bearer(alice)).status_code == 200
        http.post(f"/api/jobs/{ids[2]}/cancel", headers=bearer(alice))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.headers = bearer(alice)  # every call as a real creator, whatever header was generated
    return schema


@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, except the 503 of the payment routes on a coordinator without a chain."""
    if response.status_code == 503 and "payments are off" in response.text:
        return True
    return not_a_server_error(ctx, response, case)


def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in the schema (the routes do not touch the store to be listed)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = create_app(None, BlobStore(Path(tmp) / "blobs")).openapi()
    return [(m.upper(), path) for path, ops in spec["paths"].items() for m in ops]


OPERATIONS = _operations()


def test_every_operation_is_fuzzed():
    assert len(OPERATIONS) >= 20 and ("PUT", "/api/blobs/{sha256}") in OPERATIONS


# schemathesis.pytest.from_fixture does not work with pytest 9 (it reads Function._nodeid), so each
# operation is one parametrized test that draws cases from the operation's strategy itself.
@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_never_answers_500(api_schema, method, path):
    op = api_schema[path][method]
    cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def fuzz(case):
        case.call_and_validate(checks=[no_server_error, response_schema_conformance])

    fuzz()


@pytest.fixture(scope="module")
def auth_http(tmp_path_factory):
    engine, blobs = make_engine_and_store(tmp_path_factory.mktemp("auth"))
    make_user(engine, "alice")
    with TestClient(create_app(engine, blobs)) as http:
        yield http


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(header=st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b) |
       st.builds(lambda t: b"Bearer " + t.encode("latin-1"), st.text(st.characters(max_codepoint=255), max_size=60)
                 .filter(lambda t: "\r" not in t and "\n" not in t)),
       path=st.sampled_from(["/api/me", "/api/jobs", "/api/workers", "/api/jobs/1", "/api/wallet"]))
def test_random_authorization_headers_are_401(auth_http, header, path):
    """The header the fuzz above replaces with a real token: any other value is a 401 that says what to send."""
    r = auth_http.get(path, headers={"Authorization": header})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"], (header, r.status_code, r.text)
