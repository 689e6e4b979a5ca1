"""The proxy's upstream servers: which are healthy, which to send a request to.

- Every server is a :class:`Backend` with its in-flight request count and its consecutive
  failures. A server that fails ``eject_after`` times in a row (requests or health checks)
  is *ejected*: no new request goes to it while another server of its role is healthy.
- :meth:`Pool.check` probes ``GET /health``; an ejected server that answers 200 is
  re-admitted, a healthy one that does not answer counts a failure.
- :meth:`Pool.pick` chooses among the healthy servers, skipping those a request already
  tried: ``round_robin``, or ``least_outstanding`` (fewest in-flight requests, ties in
  round-robin order). With none healthy it still tries the ejected ones (oldest ejection
  first) rather than fail a request outright.

Time is passed in (``now``, monotonic seconds), so the logic is testable without sleeping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("kvbridge.proxy")

POLICIES = ("least_outstanding", "round_robin")


@dataclass
class Backend:
    """One upstream vLLM server."""

    url: str
    role: str
    healthy: bool = True
    #: Requests sent to it and not finished yet.
    outstanding: int = 0
    #: Failures in a row (a success or a passing health check resets it).
    fails: int = 0
    #: When it was ejected (monotonic seconds; None while healthy).
    ejected_at: float | None = None
    #: Requests it finished, successful or not (for /metrics and tests).
    served: int = 0
    last_error: str = ""


class Pool:
    """The servers of one role ("prefill" or "decode")."""

    def __init__(self, role: str, urls: Iterable[str], policy: str = "least_outstanding", eject_after: int = 2) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.role, self.policy, self.eject_after = role, policy, max(1, eject_after)
        self.backends = [Backend(u.rstrip("/"), role) for u in urls]
        if not self.backends:
            raise ValueError(f"need at least one {role} server")
        self._next = 0

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def pick(self, exclude: Iterable[Backend] = ()) -> Backend | None:
        """The server for the next request, not one of ``exclude``; None if all were tried."""
        skip = {id(b) for b in exclude}
        n = len(self.backends)
        # Round-robin order from the cursor, so ties (and round_robin itself) rotate.
        order = [self.backends[(self._next + i) % n] for i in range(n)]
        ready = [b for b in order if b.healthy and id(b) not in skip]
        if not ready:
            # Nobody healthy left: the longest-ejected server may have come back.
            ready = sorted((b for b in order if id(b) not in skip), key=lambda b: b.ejected_at or 0.0)
            if not ready:
                return None
            choice = ready[0]
        elif self.policy == "least_outstanding":
            choice = min(ready, key=lambda b: b.outstanding)
        else:
            choice = ready[0]
        self._next = (self.backends.index(choice) + 1) % n
        return choice

    def succeeded(self, b: Backend) -> None:
        b.fails, b.served, b.last_error = 0, b.served + 1, ""
        if not b.healthy:
            self._readmit(b, "a request succeeded")

    def failed(self, b: Backend, why: str, now: float) -> bool:
        """Count a failure of ``b``; True if it was ejected by it."""
        b.fails, b.served, b.last_error = b.fails + 1, b.served + 1, why
        if b.healthy and b.fails >= self.eject_after:
            b.healthy, b.ejected_at = False, now
            log.warning("ejecting %s server %s after %d failures in a row (last: %s)", self.role, b.url, b.fails, why)
            return True
        return False

    def probed(self, b: Backend, ok: bool, why: str, now: float) -> None:
        """The result of a health check of ``b``."""
        if ok:
            b.fails = 0
            if not b.healthy:
                self._readmit(b, "its /health answers")
        else:
            b.fails, b.last_error = b.fails + 1, why
            if b.healthy and b.fails >= self.eject_after:
                b.healthy, b.ejected_at = False, now
                log.warning("ejecting %s server %s: /health failed %d times (%s)", self.role, b.url, b.fails, why)

    def _readmit(self, b: Backend, why: str) -> None:
        b.healthy, b.ejected_at = True, None
        log.warning("re-admitting %s server %s: %s", self.role, b.url, why)
