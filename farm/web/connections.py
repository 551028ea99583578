"""What one HTTP connection may cost the coordinator: a slot under a global and a per-address cap, and time
bounded at every stage of a request, before the app sees it.

The attack this answers: 1,100 connections that each sent half a request line and then nothing held 1,100
file descriptors for ever (uvicorn has a keep-alive timeout but no header timeout: any byte cancels its
keep-alive timer, and a fresh connection has no timer at all), so the API and the worker plane's new
connections were refused (``EMFILE``). :func:`protocol_class` builds a subclass of uvicorn's h11 protocol
(``uvicorn.Config(http=...)``, see :func:`uvicorn_options`) that adds, per connection:

* **admission** (:class:`ConnectionTable`): at most ``max_connections`` open HTTP connections in all and
  ``max_per_ip`` from one address (an IPv6 client counts by its /64, which one host gets for free). A
  connection beyond either is answered 503 with a ``Retry-After`` and closed in ``connection_made``, before
  a byte is read: its descriptor is released on the next turn of the event loop;
* **a header deadline**: the request line and headers must be complete ``header_timeout`` seconds after
  the connection opened, or after the previous response on a keep-alive connection. It is a deadline, not
  an idle timer, so trickling a byte a second buys nothing. A connection that sent part of a request is
  answered 408 and closed; one that sent nothing is closed silently (an unsolicited 408 on an idle
  keep-alive connection would be read by some clients as the answer to their next request);
* **a body deadline**: a body that stalls (no bytes for ``body_idle_timeout``) or crawls (under
  ``body_min_rate`` bytes a second on average, after the first ``body_idle_timeout`` seconds, as Apache's
  ``mod_reqtimeout`` does) is answered 408 and closed, and the route's ``receive()`` returns
  ``http.disconnect`` at once (the upload route then deletes its temporary file). Time during which the
  coordinator itself stopped reading (uvicorn pauses a connection while the app has 64 KiB unread) is
  never counted against the client, so a slow route cannot make a client look slow, and a large upload
  that keeps moving is never cut.

Why connections and not uvicorn's ``limit_concurrency``: that option counts requests (and open
connections) only once a request's headers are parsed, and answers *that* request 503 — the idle or
half-sent connections that cost the descriptors are never touched, and the request that did finish its
headers is the one turned away. A descriptor is spent at ``accept()``, so the cap is enforced there. The
per-address cap is what keeps one host from taking the whole global cap; the global cap is what keeps
many hosts from taking the process's descriptors (``farm serve`` raises ``RLIMIT_NOFILE`` to its hard
limit, :func:`raise_open_file_limit`, so that these caps, not the OS, are what binds, with room left for
the worker plane and the database). Behind a reverse proxy every connection comes from the proxy's
address: set ``RENDERHIVE_HTTP_MAX_PER_IP`` to the global cap there and let the proxy limit per client.

Invariant: every connection admitted in ``connection_made`` is released exactly once, in
``connection_lost``; a refused one is never counted. WebSocket upgrades are off (the app has no WebSocket
route; an upgraded connection would leave this protocol and its slot would never be released).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("farm.web.connections")

HEADER_TIMEOUT = 10.0
"""Seconds from accept (or from the end of the previous response) to a complete request head. A real
client sends its head in one packet; 10 s covers a phone on a bad link (nginx's default is 60 s, Apache's
mod_reqtimeout 20-40 s: shorter here because a held slot is what an attacker buys)."""

BODY_IDLE_TIMEOUT = 30.0
"""Seconds a request body may go without a byte before it is answered 408 (nginx ``client_body_timeout``
60 s). Long enough for a stalled Wi-Fi link to recover; an upload that resumes within it is not cut."""

BODY_MIN_RATE = 500.0
"""Average bytes a second a body must keep up after its first BODY_IDLE_TIMEOUT seconds (mod_reqtimeout's
``MinRate=500``): 4 kbit/s, which any real upload exceeds. Without it a byte every 29 s holds a slot for
ever. 0 turns the check off."""

MAX_CONNECTIONS = 512
"""Open HTTP connections in all. Creators hold few (the CLI one at a time, a browser about six per page and
an event stream per open job page); workers speak ZeroMQ and hold none. 512 leaves most of even a 1,024
descriptor limit to the worker plane, SQLite and blob files."""

MAX_PER_IP = 64
"""Open HTTP connections from one address (an IPv6 /64). Ten browser tabs with event streams, the add-on and
the CLI fit; so do the test suite and ``make demo``, which all come from 127.0.0.1."""

HEADER_BYTES = 16 * 1024
"""Largest request head (line and headers) h11 buffers before answering 400: h11's own default, stated here
so the worst case in README is read from one place."""

FD_RESERVE = 256
"""Descriptors kept for everything but HTTP connections (ZeroMQ sockets, SQLite, blob files, logs) when
checking that the open file limit leaves room for MAX_CONNECTIONS."""

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between warnings about refused connections: a flood must not become a flood of log lines."""


def _env(name: str, default: float) -> float:
    raw = os.environ.get(f"RENDERHIVE_HTTP_{name}")
    return float(raw) if raw else default


@dataclass(frozen=True)
class HttpLimits:
    """The limits of one server; :meth:`from_env` reads ``RENDERHIVE_HTTP_<NAME>`` (e.g.
    ``RENDERHIVE_HTTP_MAX_CONNECTIONS``) over the module defaults."""
    header_timeout: float = HEADER_TIMEOUT
    body_idle_timeout: float = BODY_IDLE_TIMEOUT
    body_min_rate: float = BODY_MIN_RATE
    max_connections: int = MAX_CONNECTIONS
    max_per_ip: int = MAX_PER_IP

    @classmethod
    def from_env(cls) -> HttpLimits:
        return cls(header_timeout=_env("HEADER_TIMEOUT", HEADER_TIMEOUT),
                   body_idle_timeout=_env("BODY_IDLE_TIMEOUT", BODY_IDLE_TIMEOUT),
                   body_min_rate=_env("BODY_MIN_RATE", BODY_MIN_RATE),
                   max_connections=int(_env("MAX_CONNECTIONS", MAX_CONNECTIONS)),
                   max_per_ip=int(_env("MAX_PER_IP", MAX_PER_IP)))


def client_key(peername: Any) -> str:
    """The address a connection counts against: an IPv4 address, or the /64 of an IPv6 one (an IPv4-mapped
    IPv6 address counts as its IPv4 address); anything else (a Unix socket) counts as one client."""
    if not isinstance(peername, (tuple, list)) or not peername:
        return "local"
    try:
        ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    except ValueError:
        return str(peername[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionTable:
    """Open connections, in all and by :func:`client_key`. Used from the event loop's thread only."""

    def __init__(self, limits: HttpLimits):
        self.limits = limits
        self.total = 0
        self.by_client: dict[str, int] = {}
        self._refused = 0
        self._last_warning = 0.0

    def admit(self, key: str) -> str | None:
        """Count a new connection from ``key``; or, when a cap is reached, count nothing and return why."""
        held = self.by_client.get(key, 0)
        if self.total >= self.limits.max_connections:
            why = (f"the coordinator has {self.total} HTTP connections open, its limit "
                   "(RENDERHIVE_HTTP_MAX_CONNECTIONS): retry in a few seconds")
        elif held >= self.limits.max_per_ip:
            why = (f"too many connections from your address ({held} open, the limit per address is "
                   f"{self.limits.max_per_ip}, RENDERHIVE_HTTP_MAX_PER_IP): close idle connections or reuse "
                   "one (keep-alive), then retry")
        else:
            self.total += 1
            self.by_client[key] = held + 1
            return None
        self._note_refusal(key, why)
        return why

    def release(self, key: str) -> None:
        self.total -= 1
        left = self.by_client[key] - 1
        if left:
            self.by_client[key] = left
        else:
            del self.by_client[key]  # the table holds only clients with open connections

    def _note_refusal(self, key: str, why: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._last_warning >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d HTTP connection(s) since the last warning; latest from %s: %s",
                        self._refused, key, why)
            self._refused, self._last_warning = 0, now


class _TimedFlowControl(FlowControl):
    """uvicorn's flow control, also keeping how long reading was paused by the coordinator itself (so that
    time is never counted as the client's)."""

    def __init__(self, transport: asyncio.Transport, clock):
        super().__init__(transport)
        self._clock = clock
        self.paused_total = 0.0
        self.resumed_at = clock()
        self._paused_at = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_at = self._clock()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.resumed_at = self._clock()
            self.paused_total += self.resumed_at - self._paused_at
        super().resume_reading()

    def paused_so_far(self) -> float:
        return self.paused_total + (self._clock() - self._paused_at if self.read_paused else 0.0)


def _raw_response(status: int, reason: str, detail: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete JSON error response (the API's ``{"detail": ...}`` shape) written past h11, for a
    connection that is closed right after it: h11 cannot send a response to a request it has not parsed."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with admission and deadlines (module docstring). Built per server by
    :func:`protocol_class`, which sets :attr:`limits` and :attr:`table`.

    One timer at a time per connection, for the stage it is in: waiting for a head (deadline), reading a
    body (idle and rate), or none while the app works and answers. A new request is recognised by
    uvicorn creating a new request cycle (``self.cycle``), which it does when h11 has parsed the head."""

    limits: ClassVar[HttpLimits]
    table: ClassVar[ConnectionTable]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._key: str | None = None  # None: refused (never counted)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_cycle: Any = None  # the cycle current when the head deadline was armed
        self._head_bytes = 0
        self._body_at = self._last_byte = self._paused_at_start = 0.0
        self._body_bytes = 0

    # ------------------------------------------------------------ the connection's life
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        key = client_key(transport.get_extra_info("peername"))
        why = self.table.admit(key)
        if why is not None:
            self.transport = transport
            retry = str(max(1, math.ceil(self.limits.header_timeout)))  # when idle slots free up
            transport.write(_raw_response(503, "Service Unavailable", why, (("retry-after", retry),)))
            transport.close()  # nothing read, nothing buffered: the socket is closed on the loop's next turn
            return
        self._key = key
        super().connection_made(transport)
        self.flow = _TimedFlowControl(transport, self.loop.time)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._key is None:
            return
        self._cancel_timer()
        self.table.release(self._key)
        self._key = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._key is None:
            return
        cycle = self.cycle
        if self._timer is not None and self._waiting_cycle is cycle:
            self._head_bytes += len(data)
        else:
            self._body_bytes += len(data)
            self._last_byte = self.loop.time()
        super().data_received(data)
        if self.cycle is not cycle:  # h11 parsed a whole head: a new request began
            self._request_began()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is not cycle:  # a pipelined request was already buffered and has begun
            self._request_began()
        else:
            self._await_head()

    def _should_upgrade(self) -> bool:
        """Never upgrade (no WebSocket routes), and do not log two warnings per request that asks to."""
        return False

    # ------------------------------------------------------------ stages
    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float, callback) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(max(delay, 0.01), callback)

    def _await_head(self) -> None:
        self._waiting_cycle, self._head_bytes = self.cycle, 0
        self._arm(self.limits.header_timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        self._timer = None
        if self.cycle is not self._waiting_cycle or self.transport.is_closing():
            return
        if self._head_bytes:
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request line and headers did not arrive within "
                f"{self.limits.header_timeout:g} s: send the whole request head at once"))
        self.transport.close()

    def _request_began(self) -> None:
        self._cancel_timer()
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:
            return  # no body to wait for: the app has the request, and its answer is not timed here
        now = self.loop.time()
        self._body_at = self._last_byte = now
        self._body_bytes = 0
        self._paused_at_start = self.flow.paused_so_far()
        self._arm(self.limits.body_idle_timeout, self._body_check)

    def _body_check(self) -> None:
        self._timer = None
        cycle = self.cycle
        if (self.transport.is_closing() or cycle is None or not cycle.more_body or cycle.response_complete
                or cycle.disconnected):
            return  # the body is complete, or the request is over
        now, lim = self.loop.time(), self.limits
        if self.flow.read_paused:  # we are not reading: the wait is ours, not the client's
            return self._arm(lim.body_idle_timeout, self._body_check)
        if cycle.waiting_for_100_continue:  # nor is it before the app asks for the body (Expect: 100-continue)
            self._body_at = self._last_byte = now
            return self._arm(lim.body_idle_timeout, self._body_check)
        idle_since = max(self._last_byte, self.flow.resumed_at)
        if now - idle_since >= lim.body_idle_timeout:
            return self._body_timeout(f"no bytes of the request body arrived for {lim.body_idle_timeout:g} s: "
                                      "check the connection and send the request again")
        rate_deadline = float("inf")
        if lim.body_min_rate > 0:
            credit = lim.body_idle_timeout + self._body_bytes / lim.body_min_rate
            rate_deadline = self._body_at + credit + (self.flow.paused_so_far() - self._paused_at_start)
            if now >= rate_deadline:
                took = max(now - self._body_at, 1e-9)
                return self._body_timeout(
                    f"the request body arrived at {self._body_bytes / took:.0f} bytes/s, under the minimum of "
                    f"{lim.body_min_rate:g} bytes/s (RENDERHIVE_HTTP_BODY_MIN_RATE): send it over a faster "
                    "connection")
        self._arm(min(idle_since + lim.body_idle_timeout, rate_deadline) - now, self._body_check)

    def _body_timeout(self, detail: str) -> None:
        """408 (unless the app already answered), then the route sees a disconnect and the socket closes."""
        cycle = self.cycle
        if not cycle.response_started:
            self.transport.write(_raw_response(408, "Request Timeout", detail))
        cycle.disconnected = True  # anything the app still sends is dropped (uvicorn's own flag)
        cycle.message_event.set()  # a route waiting in receive() gets http.disconnect now
        self.transport.close()


def protocol_class(limits: HttpLimits | None = None) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its own :class:`ConnectionTable` over ``limits`` (default: from the
    environment). uvicorn instantiates it once per connection."""
    limits = limits or HttpLimits.from_env()
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "table": ConnectionTable(limits)})


def uvicorn_options(limits: HttpLimits | None = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``: the guarded protocol (always h11, whether or not httptools is
    installed, since the deadlines hook into h11's request cycle), no WebSocket upgrades, the head size."""
    return {"http": protocol_class(limits), "ws": "none", "h11_max_incomplete_event_size": HEADER_BYTES}


def raise_open_file_limit(limits: HttpLimits | None = None) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, so the HTTP caps bind before the OS does; warn
    when even the hard limit leaves too little room for them. Returns (soft before, soft now)."""
    limits = limits or HttpLimits.from_env()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = soft
    # an unlimited hard limit cannot be the soft one: Linux caps it at fs.nr_open, macOS at OPEN_MAX
    for want in ((hard,) if hard != resource.RLIM_INFINITY else (1 << 20, 10240)):
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            new = want
            break
        except (ValueError, OSError):
            continue
    log.info("open file limit %d (was %d, hard limit %s): HTTP connections are capped at %d, %d per address",
             new, soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, limits.max_connections,
             limits.max_per_ip)
    if new < limits.max_connections + FD_RESERVE:
        log.warning("the open file limit (%d) leaves fewer than %d descriptors beside %d HTTP connections: "
                    "raise it (ulimit -Hn) or lower RENDERHIVE_HTTP_MAX_CONNECTIONS", new, FD_RESERVE,
                    limits.max_connections)
    return soft, new
