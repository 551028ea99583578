"""A creator with a wallet of their own, in a real browser (Debian's Chromium driven by Playwright), against a
real farm settling on a real anvil node, with a real worker.

The page talks to the wallet through the standard EIP-1193 provider (``window.ethereum``). The one injected
here forwards every request to anvil, whose unlocked dev account signs (personal_sign, eth_signTypedData_v4,
eth_sendTransaction): a working wallet, not a mock signer. The farm is given only its operator key, so it
holds no key of the creator's account: the job can be deposited, approved and paid only by that account.
"""
from __future__ import annotations

import json
import urllib.request

from eth_utils import keccak

from tests.anvil import anvil  # noqa: F401  (fixture)
from tests.conftest import submit_sample, wait_for, wait_job, wait_workers
from tests.web.test_web import browser, settled_page, sign_in  # noqa: F401  (fixture)

PROVIDER = """
window.ethereum = {
  isRenderhiveTest: true,
  request: async ({method, params}) => {
    if (method === "eth_requestAccounts" || method === "eth_accounts") return [ACCOUNT];
    if (method === "wallet_switchEthereumChain") throw new Error("this wallet has one chain");
    const r = JSON.parse(await window.__anvil(JSON.stringify({method, params: params || []})));
    if (r.error) { const e = new Error(r.error.message); e.code = r.error.code; throw e; }
    return r.result;
  },
};
"""


def forwarder(url: str):
    """The wallet's node: each EIP-1193 request goes to anvil as JSON-RPC (anvil signs for its accounts)."""
    def rpc(body: str) -> str:
        req = json.loads(body)
        data = json.dumps({"jsonrpc": "2.0", "id": 1, "method": req["method"], "params": req["params"]}).encode()
        http = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(http, timeout=30) as resp:
            return resp.read().decode()
    return rpc


def browse_until(page, pred, timeout: float) -> None:
    """Wait for ``pred`` while the page runs: the sync Playwright API calls the exposed wallet function
    only while the test is inside a Playwright call."""
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s")
        page.wait_for_timeout(250)


def mint(anvil, token: str, to: str, amount: int) -> None:  # noqa: F811
    """The creator buys tokens (the dev token's deployer, the operator, mints them): outside the page."""
    data = "0x" + keccak(text="mint(address,uint256)")[:4].hex() + to[2:].lower().rjust(64, "0") + f"{amount:064x}"
    operator = anvil.rpc("eth_accounts")[0]
    h = anvil.rpc("eth_sendTransaction", [{"from": operator, "to": token, "data": data}])
    assert wait_for(lambda: anvil.rpc("eth_getTransactionReceipt", [h]), 10, what="mint mined")["status"] == "0x1"


def test_link_deposit_and_approve_with_the_creators_own_wallet(farm, worker, browser, anvil, tmp_path):  # noqa: F811
    f = farm(anvil.env())
    pay_to = anvil.rpc("eth_accounts")[7]
    worker(f, "w1", args=["--wallet", pay_to])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    account = anvil.rpc("eth_accounts")[3]  # the creator's wallet: anvil holds its key, the farm does not
    mint(anvil, alice.my_wallet()["token"], account, 1000 * 10**18)

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.expose_function("__anvil", forwarder(anvil.url))
    page.add_init_script(PROVIDER.replace("ACCOUNT", json.dumps(account)))
    sign_in(page, f.url, alice.token)
    page.get_by_role("button", name="Connect wallet").click()
    page.wait_for_selector("#wallet-msg:has-text('Linked')", timeout=30_000)
    mine = alice.my_wallet()
    assert mine["own_address"].lower() == account.lower() and mine["custodial"] is False

    job = submit_sample(alice, "1-2")
    assert wait_for(lambda: alice.payment(job["id"])["status"] == "funding", 20, what="the job waits for a deposit")
    assert alice.job(job["id"])["status"] == "funding"
    page.goto(f"{f.url}/jobs/{job['id']}")
    assert "own wallet" in page.locator("#wallet-kind").inner_text()
    page.get_by_role("button", name="Deposit from your wallet").click()
    try:  # the wallet's requests are answered while the page is waited on (Playwright's sync API)
        browse_until(page, lambda: alice.job(job["id"])["status"] != "funding", 60)
    except AssertionError:
        raise AssertionError(f"the deposit did not start the job; the page said: "
                             f"{page.locator('#wallet-msg').inner_text()!r}; payment: {alice.payment(job['id'])}") from None
    done = wait_job(alice, job["id"], timeout=180)
    assert done["status"] == "rendered", done
    settled_page(page, "rendered")  # the page reloads itself on each status change: a goto now could race it
    assert page.locator("#approve").count() == 0, "no custodial approve form for a job paid from the own wallet"
    page.get_by_role("button", name="Approve with your wallet and pay the workers").click()
    page.wait_for_selector("#download", timeout=60_000)
    browse_until(page, lambda: alice.payment(job["id"])["status"] == "paid", 60)
    paid = alice.payment(job["id"])

    assert paid["creator_wallet"].lower() == account.lower()
    kinds = [t["kind"] for t in paid["transactions"]]
    assert "open" not in kinds and "allow" not in kinds, f"the farm deposited for the creator: {kinds}"
    assert kinds.count("approve") == 1 and "settle" not in kinds, kinds
    credited = alice.wallet(pay_to)
    share = sum(int(w["amount"]) for w in alice.payouts(job["id"])["workers"] if w["wallet"])
    assert share > 0 and int(credited["escrow_credit"]) == share, "the worker is credited its share on chain"
    settled_page(page, "paid")
    page.screenshot(path=tmp_path / "own-wallet-paid.png", full_page=True)
