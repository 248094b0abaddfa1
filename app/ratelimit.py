"""In-process token-bucket rate limits: logins per client address, judgements per labeller.

Each key owns a bucket of `burst` tokens refilled at `per_minute / 60` tokens a second; a request
takes one token or is refused with 429 and a Retry-After header saying when the next token arrives.
Buckets live in the serving process, so with N uvicorn workers a client can get up to N times the
limit; that is enough to stop token guessing and runaway clients without a shared store.

The client address is the TCP peer's, unless the peer is one of DENSEALIGN_TRUSTED_PROXIES: only then
is X-Forwarded-For read (anyone can send that header, so believing it from any peer would give a
guesser a fresh bucket per request).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.deps import CurrentLabeller
from core.db.models import Labeller

# Beyond this many keys the full (idle) buckets are dropped, so memory stays bounded.
MAX_KEYS = 10_000


class TokenBucket:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last update)
        self._lock = threading.Lock()  # sync routes run in a thread pool

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when allowed, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, updated = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                if len(self._buckets) > MAX_KEYS:
                    self._drop_idle(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _drop_idle(self, now: float) -> None:
        refill = float(self.burst) / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}


def too_many(what: str, wait: float, setting: str) -> HTTPException:
    seconds = max(1, math.ceil(wait))
    return HTTPException(
        status_code=429,
        detail=f"too many {what}; wait {seconds} s and try again (limit set by {setting})",
        headers={"Retry-After": str(seconds)},
    )


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an address (a hostname, or garbage in the header): never a trusted proxy
    return any(ip in network for network in proxies)


def forwarded_client(peer: str, forwarded_for: list[str], proxies: Sequence[Network]) -> str:
    """The client behind `peer`: `peer` itself unless it is a trusted proxy; then the right-most
    X-Forwarded-For address that is not a trusted proxy (each proxy appends the address it saw, so
    everything left of that one was written by the client and may be forged)."""
    if not is_trusted(peer, proxies):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer  # every hop is a trusted proxy: the first is the client


def client_address(request: Request) -> str:
    if request.client is None:
        return "unknown"
    proxies: Sequence[Network] = request.app.state.trusted_proxies
    return forwarded_client(request.client.host, request.headers.getlist("x-forwarded-for"), proxies)


async def limit_logins(request: Request) -> None:
    """Login-type attempts (token login, invite acceptance), per client address."""
    wait = request.app.state.login_limiter.take(client_address(request))
    if wait:
        raise too_many("login attempts from your address", wait, "DENSEALIGN_LOGIN_RATE_PER_MINUTE")


async def limit_judgements(request: Request, labeller: CurrentLabeller) -> Labeller:
    """Judgement posts, per labeller; returns the labeller so routes can depend on this alone. Async:
    the bucket is an in-memory lock and a few additions, so the event loop runs it without a hop to
    the thread pool."""
    wait = request.app.state.judgement_limiter.take(str(labeller.id))
    if wait:
        raise too_many("judgements", wait, "DENSEALIGN_JUDGEMENT_RATE_PER_MINUTE")
    return labeller


LoginLimit = Depends(limit_logins)
RateLimitedLabeller = Annotated[Labeller, Depends(limit_judgements)]
