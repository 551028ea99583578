"""What the attack modules share: the attack names, their intensity, the target farm, and the tally of
what the attackers saw (tests/helpers/attacks.py runs them)."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass

ATTACKS = ("big_posts", "oversized_json", "slowloris", "blob_flood", "hello_flood", "throwaway_keys", "hoarder",
           "boasting_hoarders", "bomb_image", "bomb_image_16k")
LEASE_ATTACKS = {"blob_flood", "hoarder", "boasting_hoarders", "bomb_image", "bomb_image_16k"}
"""Attacks that need leases of the honest job: their workers say READY before it is queued."""
HEAD = b"GET /api/health HTTP/1.1\r\nHost: farm\r\n"
"""A request head that never ends (no blank line)."""
BIG = 64 * 1024 * 1024


@dataclass
class Intensity:
    """How hard each attack pushes at scale 1 (``scaled(k)`` multiplies the counts)."""
    big_posts: int = 4            # anonymous 64 MiB POSTs at once, each sent again once answered
    oversized_json: int = 2       # authenticated oversized requests at once
    slowloris: int = 300          # half-sent heads from 127.0.1.1
    slowloris_spread: int = 3     # more addresses (127.0.1.2…), SLOWLORIS_PER_SPREAD heads each (not scaled)
    leeches: int = 2              # workers that take a lease each, then flood
    blob_gets: int = 6000         # BLOB_GETs of each leech, sent at once
    hello_fakes: int = 300        # fake worker ids on one socket, per round
    throwaway_keys: int = 150     # fresh keys, per round
    hello_rounds: int = 2         # rounds of both HELLO floods, HELLO_ROUND_GAP apart
    hoard_slots: int = 4          # slots the hoarder says it has
    boasters: int = 12            # boasting hoarders (one slot each)

    def scaled(self, k: float) -> Intensity:
        keep = {"slowloris_spread", "hello_rounds"}  # the spread stays under the 512 cap (beyond it: by design)
        return Intensity(**{n: v if n in keep else max(1, round(v * k)) for n, v in asdict(self).items()})


SLOWLORIS_PER_SPREAD = 60
HELLO_ROUND_GAP = 8.0
WORKER_SOURCE = "127.0.2.1"
"""The address the attacking workers connect from (the honest ones, and the probe, use 127.0.0.1): the
coordinator limits CURVE handshakes per address, and an attacker is not on the honest workers' host."""
HELLO_FLOOD_SOURCE, THROWAWAY_SOURCE = "127.0.2.2", "127.0.2.3"


@dataclass
class Target:
    """Where the coordinator is and what an attacker knows of it (JSON-serialisable, for the child)."""
    http_port: int
    endpoint: str
    server_key_file: str
    token: str                    # a creator's own token (the authenticated oversized requests)
    scene_sha256: str             # the honest job's scene (what the leech asks for)
    work: str                     # a folder for the child's files (target, report, log)


class Tally:
    """Counts per attack, from many threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = {}
        self.values: dict[str, dict] = {}

    def add(self, attack: str, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts.setdefault(attack, Counter())[what] += n

    def peak(self, attack: str, what: str, value: float) -> None:
        with self.lock:
            d = self.values.setdefault(attack, {})
            d[what] = max(d.get(what, value), value)

    def note(self, attack: str, what: str, value) -> None:
        with self.lock:
            self.values.setdefault(attack, {})[what] = value

    def report(self) -> dict:
        with self.lock:
            return {a: {**dict(self.counts.get(a, {})), **self.values.get(a, {})}
                    for a in sorted(set(self.counts) | set(self.values))}


