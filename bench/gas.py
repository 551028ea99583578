"""Gas of the escrow's steps per job, for 1, 10 and 100 workers (and the 512-worker cap), on a real EVM.

    python bench/gas.py [--quick] [--n 1,10,100,512]

For each worker count N, one job on the in-process EVM (eth-tester on py-evm: the same gas schedule as
mainnet's current fork), with N fresh worker addresses:

* **open**: the creator's ``open_job`` (pulls the deposit), after its token ``approve``;
* **post**: the operator's ``post_payouts`` with N (worker, amount) pairs (the list goes in calldata and
  in the PayoutsPosted event; only its hash is stored);
* **approve** and **approve_by_sig**: the creator's approval, directly and as an EIP-712 signature
  relayed by the operator (two jobs, each paying N addresses never credited before: the worst case, a
  fresh storage slot per worker): credits N workers, the fee and the remainder;
* **withdraw**: one worker pulling its credit (median over the workers).

Baseline, in the same process: paying the same N workers directly with one ERC-20 ``transfer`` each
(what a Merkle-root claim costs at the very least, before its proof and its claimed-flag write). The
ratio shows the escrow's overhead per worker. Gas is deterministic, so each number is one measurement.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from farm.payments import chain as ch  # noqa: E402

T = 10**18
BLOCK_GAS = 30_000_000
FEE_BPS = 250


def gas(c: ch.Chain, key: str, call) -> int:
    return c.wait(c.sign(key, call))["gasUsed"]


def measure(n: int) -> dict[str, int]:
    c = ch.Chain.embedded_evm()
    c.deploy(None, FEE_BPS, 72 * 3600)
    op = c.operator_key
    creator = "0x" + c.backend.account_keys[1].to_bytes().hex()
    creator_addr = ch.address_of(creator)
    worker_keys = [ch.new_key() for _ in range(n)]
    workers = [ch.address_of(k) for k in worker_keys]
    workers2 = [ch.address_of(ch.new_key()) for _ in range(n)]  # job 2 pays other, equally fresh addresses
    amounts = [(i + 1) * T for i in range(n)]
    deposit = sum(amounts) * 2
    gas(c, op, c.mint(creator_addr, 4 * deposit))
    gas(c, creator, c.approve_spend(c.escrow.address, 2**256 - 1))
    out: dict[str, int] = {}
    deadline = c.timestamp() + 3600
    out["open"] = gas(c, creator, c.open_job(1, deposit, deadline))
    gas(c, creator, c.open_job(2, deposit, deadline))
    out["post"] = gas(c, op, c.post_payouts(1, workers, amounts))
    gas(c, op, c.post_payouts(2, workers2, amounts))
    out["approve"] = gas(c, creator, c.approve(1, workers, amounts))
    j = c.escrow_job(2)
    sig = c.sign_approve(creator, 2, j.round, j.payouts_hash)
    out["approve_by_sig"] = gas(c, op, c.approve_by_sig(2, workers2, amounts, sig))
    # workers need gas money to withdraw themselves
    for addr in workers[: min(n, 20)]:
        c.wait(c.sign(op, to=addr, value=T))
    out["withdraw"] = int(statistics.median(gas(c, k, c.withdraw()) for k in worker_keys[:20]))
    # baseline: pay the same workers directly, one ERC-20 transfer each, to fresh addresses
    fresh = [ch.address_of(ch.new_key()) for _ in range(n)]
    out["baseline_transfers"] = sum(gas(c, creator, c.transfer(a, amt))
                                    for a, amt in zip(fresh, amounts))
    out["job_total"] = out["open"] + out["post"] + out["approve_by_sig"] + n * out["withdraw"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 and 10 workers only")
    ap.add_argument("--n", default=None, help="worker counts, comma separated (default 1,10,100,512)")
    args = ap.parse_args(argv)
    ns = [int(x) for x in (args.n or ("1,10" if args.quick else "1,10,100,512")).split(",")]
    rows = {n: measure(n) for n in ns}
    cols = ["open", "post", "approve", "approve_by_sig", "withdraw", "job_total", "baseline_transfers"]
    print(f"{'workers':>8} " + " ".join(f"{c:>18}" for c in cols) + f" {'post % block':>12} {'approve % block':>15}"
          f" {'job/baseline':>12}")
    for n, r in rows.items():
        print(f"{n:>8} " + " ".join(f"{r[c]:>18,}" for c in cols)
              + f" {100 * r['post'] / BLOCK_GAS:>11.2f}% {100 * r['approve_by_sig'] / BLOCK_GAS:>14.2f}%"
              + f" {r['job_total'] / r['baseline_transfers']:>12.2f}")
    if len(ns) >= 2:
        lo, hi = min(ns), max(ns)
        per_post = (rows[hi]["post"] - rows[lo]["post"]) / (hi - lo)
        per_approve = (rows[hi]["approve_by_sig"] - rows[lo]["approve_by_sig"]) / (hi - lo)
        per_transfer = rows[hi]["baseline_transfers"] / hi
        print(f"\nper extra worker: post {per_post:,.0f} gas, approve {per_approve:,.0f} gas, withdraw "
              f"{rows[hi]['withdraw']:,} gas; a direct ERC-20 transfer {per_transfer:,.0f} gas")
        print(f"workers that fit one {BLOCK_GAS:,}-gas block: post ≈ {BLOCK_GAS / per_post:,.0f}, approve ≈ "
              f"{BLOCK_GAS / per_approve:,.0f} (the escrow caps a list at 512)")
        if 100 in rows:
            share = rows[100]["approve_by_sig"] / BLOCK_GAS
            print(f"decision: 100 workers' approval takes {100 * share:.1f}% of a block and their posting "
                  f"{100 * rows[100]['post'] / BLOCK_GAS:.1f}%, so the payout list is posted whole (calldata + "
                  "event, hash in storage) and credited in one approval; a Merkle root would only move the "
                  "per-worker cost into N claim transactions (each ≥ a transfer + a claimed-flag write + "
                  "its proof) and add proof plumbing for every worker.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
