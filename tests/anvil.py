"""anvil (Foundry's dev node) as a real process for the payment tests.

The binary comes from the npm package ``@foundry-rs/anvil-linux-amd64``, which ``make test`` installs
into ``.tools/`` (or set ``ANVIL`` to a binary). Each node listens on 127.0.0.1 at a free port and keeps
its state in a file (``--state``): stopped with SIGTERM it writes the file, started again it reloads it,
so a test can take the node down in the middle of a settlement and bring the same chain back.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from client.localfarm import free_port

REPO = Path(__file__).resolve().parents[1]
NPM_BIN = REPO / ".tools" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
# anvil's first dev account (from its well-known test mnemonic): prefunded, the operator in these tests
OPERATOR_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def anvil_binary() -> Path | None:
    for cand in (os.environ.get("ANVIL"), NPM_BIN, shutil.which("anvil")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


class Anvil:
    def __init__(self, root: Path, binary: Path):
        self.root, self.binary = Path(root), binary
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.root / "anvil-state.json"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "anvil.log"
        self.p: subprocess.Popen | None = None
        self.key_file = self.root / "operator.key"
        self.key_file.write_text(OPERATOR_KEY + "\n")

    def rpc(self, method: str, params: list | None = None, timeout: float = 2.0):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())["result"]

    def start(self, timeout: float = 30.0) -> "Anvil":
        with open(self.log, "ab") as log:
            self.p = subprocess.Popen([str(self.binary), "--host", "127.0.0.1", "--port", str(self.port),
                                       "--state", str(self.state), "--silent"],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"anvil exited: {self.log.read_text()[-2000:]}")
            try:
                self.rpc("eth_chainId")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"anvil did not answer on {self.url} within {timeout} s")

    @property
    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def stop(self) -> None:
        """SIGTERM: anvil writes its state file and exits."""
        if self.alive:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)

    def env(self) -> dict[str, str]:
        """Environment for `farm serve` to use this node."""
        return {"RENDERHIVE_CHAIN_RPC": self.url, "RENDERHIVE_CHAIN_KEY_FILE": str(self.key_file)}


@pytest.fixture
def anvil(tmp_path):
    """A started anvil node with a state file (stopped at the end). Skips when the binary is missing."""
    binary = anvil_binary()
    if binary is None:
        pytest.fail("anvil is not installed: run `make test` (it installs @foundry-rs/anvil-linux-amd64 into "
                    ".tools/) or set ANVIL=/path/to/anvil")
    node = Anvil(tmp_path / "anvil", binary).start()
    yield node
    node.stop()
