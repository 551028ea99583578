"""A body of nested JSON must not crash the coordinator (found in review): py-ecc, imported with the embedded
EVM, raises the recursion limit to 100,000, and then ``json.loads`` of 100 KB of ``[`` overflows the C
stack — one authenticated request killed `farm serve` with SIGSEGV. The server caps the limit once it has
started (common.limits.cap_recursion); every JSON route answers 4xx and the process lives on."""
from __future__ import annotations

import httpx

from tests.conftest import wait_for

DEPTHS = (2_000, 100_000, 400_000)
ROUTES = ("/api/jobs", "/api/estimate", "/api/wallet/link", "/api/wallet/challenge", "/api/jobs/1/reject")


def test_deeply_nested_json_is_refused_and_the_coordinator_lives(farm):
    f = farm()
    alice = f.creator("alice")
    wait_for(lambda: alice.my_wallet().get("address"), 30, what="the chain connected (py-ecc imported)")
    auth = {"Authorization": f"Bearer {alice.token}", "Content-Type": "application/json"}
    seen = {}
    with httpx.Client(base_url=f.url, timeout=30) as http:
        for route in ROUTES:
            for depth in DEPTHS:
                r = http.post(route, content=b"[" * depth + b"]" * depth, headers=auth)
                seen[(route, depth)] = r.status_code
                assert f.alive, f"the coordinator died on {depth} nested arrays sent to {route}:\n{f.tail(20)}"
        assert http.get("/api/me", headers=auth).status_code == 200
    assert all(400 <= code < 500 for code in seen.values()), seen
