"""A creator's own wallet from the command line, against a real farm settling on a real anvil node, with a
real worker: ``farm wallet --link --key-file``, ``farm deposit``, ``farm reject`` signed by an external
signing command, ``farm approve --key-file``; and the worker owner's ``farm wallet ADDRESS --rpc`` reading
what the escrow credited it from the node, not from the farm. The farm is given only its operator key."""
from __future__ import annotations

import json
import sys

from eth_account import Account

from tests.anvil import anvil  # noqa: F401  (fixture)
from tests.client.test_cli import farm_cli
from tests.conftest import submit_sample, wait_for, wait_job, wait_workers
from tests.web.test_own_wallet_browser import mint

CREATOR_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"  # anvil's account 3
SIGNER = """
import json, sys
from common import eth_sign
req = json.load(sys.stdin)
key = open(sys.argv[1]).read().strip()
sign = eth_sign.sign_typed if req["method"] == "eth_signTypedData_v4" else eth_sign.sign_message
open(sys.argv[2], "a").write(req["method"] + "\\n")
print(sign(key, req["data"]))
"""


def test_link_deposit_reject_and_approve_from_the_cli_then_the_worker_checks_its_own_node(
        farm, worker, anvil, tmp_path):  # noqa: F811
    creator = Account.from_key(CREATOR_KEY).address
    assert creator.lower() in anvil.rpc("eth_accounts")
    key_file = tmp_path / "creator.key"
    key_file.write_text(CREATOR_KEY + "\n")
    key_file.chmod(0o600)
    signer, signed_log = tmp_path / "signer.py", tmp_path / "signed.log"
    signer.write_text(SIGNER)
    pay_to = anvil.rpc("eth_accounts")[8]

    f = farm(anvil.env())
    worker(f, "w1", args=["--wallet", pay_to])
    alice = f.creator("alice")
    wait_workers(alice, 1)
    mint(anvil, alice.my_wallet()["token"], creator, 100 * 10**18)
    out = farm_cli(f, alice, "wallet", "--link", "--key-file", str(key_file)).stdout
    assert f"linked {creator}" in out

    job = submit_sample(alice, "1-2")
    wait_for(lambda: alice.payment(job["id"])["status"] == "funding", 20, what="waiting for the deposit")
    refused = farm_cli(f, alice, "approve", str(job["id"]), check=False)
    assert refused.returncode != 0
    farm_cli(f, alice, "deposit", str(job["id"]), "--key-file", str(key_file), "--rpc", anvil.url)
    assert wait_job(alice, job["id"])["status"] == "rendered"
    wait_for(lambda: alice.payment(job["id"])["status"] == "posted", 30, what="the payout list on chain")

    command = f"{sys.executable} {signer} {key_file} {signed_log}"
    farm_cli(f, alice, "reject", str(job["id"]), "--frames", "1", "--reason", "noise",
             "--sign-command", command, "--address", creator)
    assert signed_log.read_text().split() == ["eth_signTypedData_v4"], "the external signer made the rejection"
    assert wait_job(alice, job["id"])["status"] == "rendered"
    farm_cli(f, alice, "approve", str(job["id"]), "--key-file", str(key_file))
    paid = wait_for(lambda: (p := alice.payment(job["id"]))["status"] == "paid" and p, 60, what="paid on chain")
    kinds = [t["kind"] for t in paid["transactions"]]
    assert kinds.count("reject") == 1 and kinds.count("approve") == 1 and "open" not in kinds, kinds

    share = sum(int(w["amount"]) for w in alice.payouts(job["id"])["workers"] if w["wallet"])
    got = json.loads(farm_cli(f, alice, "wallet", pay_to, "--rpc", anvil.url, "--json").stdout)
    assert int(got["credited"]) == share > 0 and int(got["escrow_credit"]) == share
    assert [j["settled"] for j in got["jobs"]] == ["approved"]
