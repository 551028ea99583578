"""``farm serve``: one process running the coordinator (ZeroMQ worker plane) and the HTTP API.

Start-up order: data dir, database (schema migrated to the newest revision), blob store, admin token on
first start, the CurveZMQ keyring (keypair and enrollment token on first start, :mod:`farm.plane.gate`), then
the broker, the payment settler (:class:`farm.payments.settler.Settler`, unless ``--chain-rpc
off``) and uvicorn on one asyncio loop. SIGINT/SIGTERM stop both; state is durable at every commit, so
a ``kill -9`` loses nothing that was acknowledged.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import uvicorn

from common.keys import KeyFileError
from common.limits import cap_recursion
from farm.core.coordinator import Coordinator
from farm.payments.earnings import WorkerEarnings
from farm.payments.ledger import Ledger, chain_factory
from farm.payments.market import Market
from farm.payments.quotes import ProbeQuotes
from farm.payments.settler import Settler
from farm.plane.broker import Broker, tune_gc
from farm.plane.gate import Keyring, resolve_mode
from farm.plane.sealed_http import SealedServer
from farm.store.blobs import BlobStore
from farm.store.db import DatabaseUnavailable, database_url, make_engine, session
from farm.store.migrate import SchemaMismatch
from farm.store.sealed import SealedChannel
from farm.web import auth, connections
from farm.web.app import create_app
from farm.web.queue import queue_view

log = logging.getLogger("farm.server")

_ADMISSION = {
    "open": "any key (open farm; --admit token or allowlist to restrict it)",
    "token": "keys on {dir}/allowed, and new keys presenting the enrollment token in {dir}/enroll.token "
             "(farm worker --enroll-token)",
    "allowlist": "only keys on {dir}/allowed (farm workers allow KEY)",
}


def sealed_address(bind: str, sealed: str, http: str = "") -> tuple[str, int] | None:
    """Where the sealed blob server listens: ``sealed`` is ``auto`` (the worker plane's host, its port + 1,
    or + 2 when the API has that one; a random port when the worker plane's is random), ``off``, a port,
    or ``host:port``."""
    if sealed == "off":
        return None
    host, _, port = bind.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    if sealed == "auto":
        if port in ("0", "*"):
            return host, 0
        nxt = int(port) + 1
        return host, nxt + 1 if http.rpartition(":")[2] == str(nxt) else nxt
    shost, _, sport = sealed.rpartition(":")
    if not sport.isdigit() or int(sport) > 65535:
        raise ValueError(f"--sealed {sealed!r}: give auto, off, a port or host:port")
    return shost or host, int(sport)


async def serve(data_dir: Path, db_url: str | None, bind: str, http: str, chain_rpc: str | None = None,
                chain_key_file: str | None = None, admit: str = "auto", require_sandbox: bool = False,
                sealed: str = "auto") -> None:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:  # the schema is brought to the newest migration here (farm.store.migrate)
        engine = make_engine(database_url(data_dir, db_url))
    except (DatabaseUnavailable, SchemaMismatch) as exc:
        raise SystemExit(f"error: {exc}") from None
    factory = chain_factory(chain_rpc, chain_key_file)  # a bad --chain-rpc/--chain-key-file stops us here
    blobs = BlobStore(data_dir / "blobs")
    try:
        sealed_at = sealed_address(bind, sealed, http)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    channel = SealedChannel(blobs) if sealed_at else None
    with session(engine) as s:
        token = auth.ensure_admin(s, data_dir)
    if token:
        print(f"admin token written to {data_dir / 'admin.token'} (mode 600)", flush=True)
    try:
        keyring = Keyring(data_dir, resolve_mode(admit, bind))
    except (KeyFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"worker plane encrypted (CurveZMQ); coordinator key {keyring.server_key}: workers pin it with "
          f"`farm worker --server-key '{keyring.server_key}'`", flush=True)
    print(f"workers admitted: {_ADMISSION[keyring.mode].format(dir=keyring.dir)}", flush=True)
    # workers hear the current price after WELCOME and each job's credited share (farm.payments.earnings)
    # one market (the price by load, farm.payments.market) for the workers' PRICE, the pages and the quotes
    market = Market.for_farm(engine)
    coord = Coordinator(engine, blobs, require_sandbox=require_sandbox,
                        earnings=WorkerEarnings(payments=bool(factory), market=market),
                        # a probed job's quote is re-made on the coordinator's thread, its ETA the queue view's
                        quoting=ProbeQuotes(eta=lambda s, job: (queue_view(s, job) or {}).get("eta_seconds")),
                        sealed=channel)
    if require_sandbox:
        print("workers must sandbox their runtime children (a worker started with --no-sandbox is refused)",
              flush=True)
    broker = Broker(coord, bind, keyring=keyring)
    broker_task = asyncio.create_task(broker.run())
    endpoint = await broker.ready()
    sealed_server = await start_sealed(channel, sealed_at) if channel else None
    # payments: the settler runs beside the broker (chain I/O in a thread, job status changes on the
    # coordinator's thread through broker.call); the chain is connected by its first pass, not here
    ledger = Ledger(engine, data_dir, factory) if factory else None
    settler = Settler(ledger, broker.call) if ledger else None
    settle_task = asyncio.create_task(settler.run()) if settler else None
    host, _, port = http.rpartition(":")
    app = create_app(engine, blobs, broker, info={"worker_endpoint": endpoint, "server_key": keyring.server_key},
                     ledger=ledger, market=market)
    market_stop = asyncio.Event()
    market_task = asyncio.create_task(market.run(market_stop))  # samples the load every few seconds
    limits = connections.HttpLimits.from_env()  # caps, header and body deadlines (issue 18)
    connections.raise_open_file_limit(limits)  # so the caps, not the OS's descriptor limit, are what binds
    server = uvicorn.Server(uvicorn.Config(app, host=host or "127.0.0.1", port=int(port), log_level="warning",
                                           lifespan="off", **connections.uvicorn_options(limits)))
    server.install_signal_handlers = lambda: None  # we own the signals
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (broker.stop(), setattr(server, "should_exit", True)))
    tune_gc()  # start-up is done: what exists now lives as long as the process
    cap_recursion()  # after every import: nested JSON from strangers must raise, not overflow the C stack
    print(f"coordinator ready: workers connect to {endpoint}, API on http://{host}:{port}", flush=True)
    http_task = asyncio.create_task(server.serve())
    done, _ = await asyncio.wait({broker_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    broker.stop()
    server.should_exit = True
    if settler:
        settler.stop()
    market_stop.set()
    market_task.cancel()
    if sealed_server is not None:
        await sealed_server.stop()
        channel.close()
    await asyncio.gather(broker_task, http_task, market_task, *([settle_task] if settle_task else []),
                         return_exceptions=True)
    for t in done:
        if t.exception():
            raise t.exception()


async def start_sealed(channel: SealedChannel, at: tuple[str, int]) -> SealedServer | None:
    """The sealed blob server on ``at``; when its port is taken, none (workers fetch BLOB chunks, slower)."""
    server = SealedServer(channel, *at)
    try:
        port = await server.start()
    except OSError as exc:
        print(f"sealed blob channel off: cannot listen on {at[0]}:{at[1]} ({exc.strerror or exc}); big inputs go "
              "as BLOB chunks over CurveZMQ: choose a free port with --sealed PORT", flush=True)
        return None
    print(f"sealed blob channel on {at[0]}:{port} (big inputs, sealed once, sent by sendfile; open this port "
          "to workers as you did the worker plane's)", flush=True)
    return server
