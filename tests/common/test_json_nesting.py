"""Deep JSON nesting is refused before ``json.loads`` sees it. eth_account (through py-ecc) raises the
recursion limit to 100,000 at import, and at that limit ``json.loads(b"[" * 100000)`` overflows the C stack
and kills the process (measured: SIGSEGV). The manifest parser counts nesting first, so it cannot crash
the coordinator, a worker, or the test run itself."""
from __future__ import annotations

import sys

import eth_account  # noqa: F401  (raises the recursion limit, as in every process that signs)
import pytest

from common import manifest as M
from common.limits import cap_recursion, json_nesting


def test_nesting_is_counted_outside_strings():
    assert json_nesting(b"", 16) == 0
    assert json_nesting(b'{"a": {"b": [1, 2]}}', 16) == 3
    tricky = b'{"a": "' + b"[" * 40 + b'\\"' + b"{" * 40 + b'", "b": [[1]]}'
    assert json_nesting(tricky, 16) == 3, "brackets inside strings (with escaped quotes) do not count"
    assert json_nesting(b"[" * 1_000_000, 16) == 17, "counted only up to the limit + 1"


def test_a_deeply_nested_manifest_is_refused_at_any_recursion_limit():
    assert sys.getrecursionlimit() >= 100_000, "eth_account raised it (the condition that crashed)"
    for body in (b"[" * 100_000, b'{"files": ' * 50_000):
        with pytest.raises(M.ManifestError, match="nested more than"):
            M.loads(body)


def test_cap_recursion_lowers_and_never_raises():
    before = sys.getrecursionlimit()
    try:
        assert cap_recursion(5000) == 5000
        assert cap_recursion(20_000) == 5000
    finally:
        sys.setrecursionlimit(before)
