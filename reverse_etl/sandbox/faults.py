"""Injected failures, so a client's retries, timeouts and job handling meet every bad day the
vendors can have, at a known rate and reproducibly (seeded RNG).

Kinds:

* ``429``: a throttle answer with ``Retry-After``, though the limits were not reached.
* ``500`` / ``503``: the vendor's server error answer; nothing is applied.
* ``reset``: the TCP connection is closed with a RST before any answer; nothing is applied.
* ``timeout``: the answer is held back ``fault_timeout_seconds`` (set it above the client's
  timeout), then the request *is* applied: the client cannot know whether it was, which is
  what idempotent retries must cope with.
* ``failed_job``: an async job or import is accepted, then ends failed with nothing applied.

Faults are drawn only on the vendor's write and job-poll endpoints (each sandbox says which),
never on lookups or on the Python inspection API.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Collection, Sequence

from starlette.requests import Request

#: Kinds that make sense on any eligible endpoint; ``failed_job`` needs a pollable job.
REQUEST_FAULTS: frozenset[str] = frozenset({"429", "500", "503", "reset", "timeout"})
JOB_FAULTS: frozenset[str] = REQUEST_FAULTS | {"failed_job"}


class FaultInjector:
    """Decides, per eligible request, whether a fault happens and which."""

    def __init__(self, rate: float, kinds: Sequence[str], seed: int):
        self.rate = rate
        self.kinds = tuple(kinds)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def draw(self, eligible: Collection[str]) -> str | None:
        """A fault kind among ``eligible`` with probability ``rate``, else None."""
        kinds = [k for k in self.kinds if k in eligible]
        if self.rate <= 0 or not kinds:
            return None
        with self._lock:
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(kinds)
            self.injected[kind] += 1
        return kind


async def drop_connection(request: Request) -> bool:
    """Reset the client's TCP connection without answering. False if the server hides it.

    ASGI has no "abort" message and an exception makes uvicorn answer 500, so this reaches the
    transport behind uvicorn's ``receive`` (its request cycle keeps it as ``transport``), sets
    ``SO_LINGER`` to zero so closing sends a RST, and aborts it. The client sees a connection
    reset (httpx: ``ReadError``/``RemoteProtocolError``, both ``TransportError``).
    """
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await asyncio.sleep(0)  # let uvicorn see the connection lost before the handler returns
    return True
