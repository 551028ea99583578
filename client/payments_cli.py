"""``farm estimate | approve | reject | payouts | wallet``: the creator's review and the money, on the CLI.

Registered by :func:`client.cli.build_parser` through :func:`add_commands`. Standard library plus rich,
like the rest of the CLI; everything goes through :class:`client.api.Client`. ``--json`` prints the API's
answer unchanged, for scripts.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from client import wallet_cli
from client.api import ApiError, Client


def _print(args, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def add_priced_args(parser) -> None:
    """--tier and --max-price, on every submit command."""
    parser.add_argument("--tier", choices=["any", "trusted", "top"], default=None,
                        help="the priced tier: any worker (1x), trusted (1.5x) or top (2x) of the market price "
                             "(`farm estimate` shows the farm's multipliers); sets --min-tier")
    parser.add_argument("--max-price", default=None, metavar="TOKENS",
                        help="refuse to start if the job's rate (tokens per measured second) is above this")


def priced_args(args) -> dict[str, Any]:
    return {"tier": getattr(args, "tier", None), "max_price": getattr(args, "max_price", None)}


def quote_line(q: dict[str, Any]) -> str:
    """The quote a submitted job got, locked for it (farm.payments.quotes)."""
    eta = q.get("eta_seconds")
    return (f"quote (locked for this job): {q['rate_tokens']} tokens per measured second "
            f"({q['price_per_unit_tokens']} market price × {q['multiplier']} tier {q['tier']}), "
            f"≈ {q['cost_tokens']} tokens, deposit {q['deposit_tokens']}"
            + (f", ETA {eta:.0f} s" if eta is not None else "")
            + (" (a guess until the probe render is measured)" if q.get("probing") else "")
            + (f"; from the probe render ({q['basis']}), which costs {q['probe_cost_tokens']} of it"
               if q.get("probe_cost_tokens") else ""))


def cmd_estimate(args, client: Client) -> int:
    est = client.estimate(frames=args.frames, chunk=args.chunk, samples=args.samples,
                          resolution_percent=args.resolution_percent, tier=args.tier, priority=args.priority)
    q = est.get("quote") or {}
    tiers = ", ".join(f"{k} {v}x" for k, v in (est.get("tiers") or {}).items())
    _print(args, est, f"{est['units']} frames × {est['seconds_per_unit']} s ({est['basis']}) × "
                      f"{est['price_per_unit_tokens']} per measured second ≈ {est['cost_tokens']} tokens; "
                      f"deposit taken at start: {est['deposit_tokens']} (the rest is refunded)"
                      + (f"\nrate: {q['price_per_unit_tokens']} market price (load {q['load']}) × {q['multiplier']} "
                         f"for tier {q['tier']}; tiers: {tiers}; the price is locked when you submit" if q else ""))
    return 0


def cmd_approve(args, client: Client) -> int:
    signer = wallet_cli.signer_of(args)
    job = wallet_cli.approve_signed(client, args.job, signer) if signer else client.approve(args.job)
    pay = client.payment(args.job)
    _print(args, {"job": job, "payment": pay},
           f"job {job['id']} {job['status']}: payouts {pay.get('status')} "
           f"(deposit {pay.get('deposit_tokens', '?')}, payouts {pay.get('payout_total_tokens', '?')} tokens)")
    return 0


def cmd_reject(args, client: Client) -> int:
    signer = wallet_cli.signer_of(args)
    job = (wallet_cli.reject_signed(client, args.job, args.frames, args.reason, signer) if signer
           else client.reject(args.job, args.frames, args.reason))
    _print(args, job, f"job {job['id']} {job['status']}: {job.get('requeued_tasks', 0)} tasks queued to render again")
    return 0


def cmd_payouts(args, client: Client) -> int:
    pay = client.payouts(args.job)
    if args.json:
        _print(args, pay, "")
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table("worker", "wallet", "measured s", "tasks", "checks (s)", "tokens", "status")
    for w in pay["workers"]:
        table.add_row(w["worker_id"], w["wallet"] or "(none: not paid)", f"{w['work_seconds']:.2f}", str(w["tasks"]),
                      f"{w.get('checks', 0)} ({w.get('check_seconds', 0):.2f})", w["amount_tokens"], w["status"])
    con = Console()
    con.print(f"job {pay['job_id']}: {'preview, ' if pay['preview'] else ''}round {pay['round']}, {pay['status']}, "
              f"{pay['price_per_unit_tokens']} tokens per {pay['unit']}, total {pay['total_tokens']}")
    con.print(table)
    return 0


def cmd_deposit(args, client: Client) -> int:
    signer = wallet_cli.signer_of(args)
    if signer is None:
        raise ApiError("farm deposit needs --key-file K: the wallet this job is paid from")
    hashes = wallet_cli.deposit(client, args.job, signer, args.rpc)
    _print(args, {"job": args.job, "transactions": hashes},
           f"job {args.job}: deposited from {signer.address} ({len(hashes)} transactions); the job starts once the "
           "farm sees the deposit" if hashes else f"job {args.job}: the deposit is in escrow already")
    return 0


def cmd_wallet(args, client: Client) -> int:
    signer = wallet_cli.signer_of(args)
    if args.link:
        if signer is None:
            raise ApiError("--link needs the wallet to sign with: --key-file K, or --sign-command CMD --address 0x…")
        w = wallet_cli.link(client, signer)
        _print(args, w, f"linked {w['own_address']}: your new jobs are paid from it and approved only by its "
                        f"signatures (farm approve JOB --key-file …); custodial wallet {w['custodial_address']}")
        return 0
    if args.move:
        r = client.request("POST", "/api/wallet/move")
        _print(args, r, f"moved {r['amount_tokens']} tokens from the custodial wallet {r['from']} to {r['to']}")
        return 0
    if args.rpc:
        address = args.address or (signer.address if signer else None)
        escrow = args.escrow
        if not (address and escrow):
            mine = client.my_wallet()
            address, escrow = address or mine["address"], escrow or mine["escrow"]
        got = wallet_cli.onchain_credits(args.rpc, escrow, address)
        lines = [f"{got['address']} on the node at {args.rpc} (block {got['block']}), escrow {got['escrow']}:"]
        lines += [f"  escrow job {j['escrow_job'][:12]}… round {j['round']}: {int(j['amount']) / 1e18:.6f} tokens "
                  f"({j['settled']}, tx {j['tx_hash'][:18]}…)" for j in got["jobs"]]
        lines.append(f"  credited in all {int(got['credited']) / 1e18:.6f}; not yet withdrawn "
                     f"{int(got['escrow_credit']) / 1e18:.6f}; in the wallet {int(got['token']) / 1e18:.6f} tokens")
        _print(args, got, "\n".join(lines))
        return 0
    if args.withdraw:
        if not args.address:
            raise ApiError("--withdraw needs the address to pay out: farm wallet 0x… --withdraw")
        res = client.withdraw(args.address)
        _print(args, res, f"withdrew {res['amount_tokens']} tokens to {res['address']} (tx {res['tx_hash']})")
        return 0
    bal = client.wallet(args.address) if args.address else client.my_wallet()
    _print(args, bal, f"{bal['address']}: {bal['token_tokens']} tokens in the wallet, "
                      f"{bal['escrow_credit_tokens']} credited in escrow (withdraw with --withdraw)")
    return 0


def add_commands(sub, client_cmd: Callable) -> None:
    e = client_cmd("estimate", "what a frame job would cost, and the deposit it takes")
    e.add_argument("--frames", required=True, help="frames like 1-24,30")
    e.add_argument("--chunk", type=int, default=1)
    e.add_argument("--samples", type=int, default=None)
    e.add_argument("--resolution-percent", type=int, default=None)
    e.add_argument("--tier", choices=["any", "trusted", "top"], default=None)
    e.add_argument("--priority", type=int, default=None, help="a positive priority pays the priority multiplier")
    e.set_defaults(func=cmd_estimate)

    a = client_cmd("approve", "approve a rendered job: its workers are paid from the escrow")
    a.add_argument("job", type=int)
    _signing_args(a)
    a.set_defaults(func=cmd_approve)

    r = client_cmd("reject", "reject frames of a rendered job: they are rendered again")
    r.add_argument("job", type=int)
    r.add_argument("--frames", required=True, help="frames to re-render, like 3,7-9")
    r.add_argument("--reason", default="", help="what is wrong with them")
    _signing_args(r)
    r.set_defaults(func=cmd_reject)

    d = client_cmd("deposit", "deposit for a job from your own wallet (its key and a node of its chain)")
    d.add_argument("job", type=int)
    d.add_argument("--rpc", required=True, help="JSON-RPC URL of a node of the farm's chain")
    _signing_args(d)
    d.set_defaults(func=cmd_deposit)

    p = client_cmd("payouts", "each worker's share of a job")
    p.add_argument("job", type=int)
    p.set_defaults(func=cmd_payouts)

    w = client_cmd("wallet", "balances of your wallet or of an address; --withdraw pays out a worker; --link "
                             "links a wallet of your own; --rpc checks credits on your own node")
    w.add_argument("address", nargs="?", default=None, help="an address (default: your own wallet)")
    w.add_argument("--withdraw", action="store_true", help="pay the address's escrow credit out to it")
    w.add_argument("--link", action="store_true", help="link the wallet of --key-file/--sign-command to your account "
                                                      "(Sign-In with Ethereum): it pays and approves your new jobs")
    w.add_argument("--move", action="store_true", help="send the custodial wallet's balance to your linked wallet")
    w.add_argument("--rpc", default=None, help="read from this node (yours, not the farm's) what the escrow "
                                               "credited the address")
    w.add_argument("--escrow", default=None, help="with --rpc: the escrow contract (default: the farm's)")
    _signing_args(w)
    w.set_defaults(func=cmd_wallet)


def _signing_args(p) -> None:
    g = p.add_argument_group("your own wallet (signs here; the farm never sees its key)")
    g.add_argument("--key-file", default=None, help="a file holding the wallet's hex private key")
    g.add_argument("--sign-command", default=None, help="an external signer: gets {method, address, data} as JSON "
                                                        "on stdin, prints the 0x signature")
    g.add_argument("--address", dest="signer_address", default=None, help="with --sign-command: the wallet's address")


# ------------------------------------------------------------------ the demo's payment part
def demo_wallet(i: int) -> str:
    """A made-up payout address for demo worker ``i`` (any 20 bytes are an address)."""
    import hashlib
    return "0x" + hashlib.sha256(f"renderhive demo worker {i}".encode()).hexdigest()[:40]


def demo_payments(con, creator: Client, job_id: int, wallets: dict[str, str], timeout: float = 120) -> None:
    """Approve the demo's render job and show each worker's token balance before and after its payout.
    Raises TimeoutError when the payment does not come (the demo then prints the logs)."""
    import time
    pay = creator.payment(job_id)
    if pay["payments"] == "off":
        con.print("payments are off on this coordinator: nothing to approve on chain")
        return

    def wait(what: str, pred) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = creator.payment(job_id)
            if pred(view):
                return view
            time.sleep(0.3)
        raise TimeoutError(f"timed out waiting for {what} (payment status: {view['status']} {view.get('error', '')})")
    with con.status("waiting for the payout list to reach the escrow"):
        wait("the payout list on chain", lambda v: v["status"] in ("posted", "approved", "paid"))
    before = {w: int(creator.wallet(a)["token"]) for w, a in wallets.items()}
    creator.approve(job_id)
    with con.status("approved: the escrow credits the workers"):
        pay = wait("the payment", lambda v: v["status"] == "paid")
    con.print(f"job {job_id} approved and paid: deposit {pay['deposit_tokens']} tokens, payouts "
              f"{pay['payout_total_tokens']}, operator fee {pay['fee_tokens']}, the rest refunded to the creator "
              f"(escrow {pay['escrow']})")
    shares = {w["wallet"].lower(): w for w in creator.payouts(job_id)["workers"]}
    for w, addr in wallets.items():
        if int(creator.wallet(addr)["escrow_credit"]):
            creator.withdraw(addr)
        after = int(creator.wallet(addr)["token"])
        share = shares.get(addr.lower())
        secs = f"{share['work_seconds']:.1f} s of measured work" if share else "no accepted work"
        con.print(f"  {w} {addr}: {before[w] / 1e18:.6f} → {after / 1e18:.6f} tokens "
                  f"([green]+{(after - before[w]) / 1e18:.6f}[/], {secs})")
