"""One memory budget for the request bodies and images the server holds, shared by every request.

Work that would allocate takes its bytes from the budget first. Over the budget a request waits briefly for
others to give bytes back, then gets 429 + Retry-After; a request that could not fit even into an empty budget
gets 413 at once, as waiting would never help. The counts are estimates made before the allocation (see
`pixels.decode_cost`); the load benchmark checks them against the process's resident memory.
"""
from __future__ import annotations

import asyncio
import threading
import time

from mobilevlm.serve.apierror import ApiError

MiB = 1024 * 1024
_POLL_S = 0.01  # bytes come back from other threads (the generation worker), so waiters poll


class MemoryBudget:
    def __init__(self, capacity: int, wait_s: float = 2.0):
        if capacity < 1:
            raise ValueError("the memory budget must be at least 1 byte")
        self.capacity, self.wait_s = capacity, wait_s
        self.used = self.peak = 0
        self._lock = threading.Lock()

    def stats(self) -> dict:
        with self._lock:
            return {"used_bytes": self.used, "peak_bytes": self.peak, "budget_bytes": self.capacity}

    def _try_take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.capacity:
                return False
            self.used += size
            self.peak = max(self.peak, self.used)
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size

    def check_fits(self, size: int, what: str) -> None:
        if size > self.capacity:
            raise ApiError(413, f"{what} needs about {size / MiB:.1f} MiB of server memory, more than its whole budget "
                                f"of {self.capacity / MiB:.1f} MiB (--memory-budget-mb); send less or smaller images",
                           code="request_too_large")

    async def take(self, size: int, what: str) -> None:
        """Takes `size` bytes, waiting up to `wait_s` for them; ApiError 413 / 429 otherwise."""
        self.check_fits(size, what)
        deadline = time.monotonic() + self.wait_s
        while not self._try_take(size):
            if time.monotonic() >= deadline:
                raise ApiError(429, f"the server is busy: its memory budget ({self.capacity / MiB:.0f} MiB) is "
                                    f"taken by other requests ({what} needs {size / MiB:.1f} MiB); retry later",
                               code="memory_budget_full", headers={"Retry-After": "1"})
            await asyncio.sleep(_POLL_S)

    def reservation(self) -> "Reservation":
        return Reservation(self)


class Reservation:
    """Bytes one request holds; `release` gives them all back and is harmless to repeat."""

    def __init__(self, budget: MemoryBudget):
        self.budget, self.size = budget, 0
        self._lock = threading.Lock()

    async def grow(self, size: int, what: str) -> None:
        self.budget.check_fits(self.size + size, what)
        await self.budget.take(size, what)
        with self._lock:
            self.size += size

    def shrink(self, size: int) -> None:
        with self._lock:
            size = min(size, self.size)
            self.size -= size
        self.budget.give(size)

    def release(self) -> None:
        self.shrink(self.size)
