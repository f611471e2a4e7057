"""The router's admission: at most `max_concurrent` requests at the workers; up to `queue_size` more
wait (each at most `timeout_secs`) for a place; anything past that is a 429 at once."""

from __future__ import annotations

import asyncio
import contextlib

from radixfair.server.errors import APIError

RETRY_AFTER_S = 1


def overloaded(message: str) -> APIError:
    return APIError(f"{message}: retry later", status=429, type_="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class Slot:
    """A place held at the workers; `release` (idempotent) hands it back."""

    def __init__(self, queue: RequestQueue) -> None:
        self._queue = queue
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._queue._release()


class RequestQueue:
    def __init__(self, max_concurrent: int, queue_size: int, timeout_secs: float) -> None:
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self.timeout_secs = timeout_secs
        self.active = 0
        self.waiting = 0
        self.refused = 0
        self._cond: asyncio.Condition | None = None  # made on first use, in the serving loop

    async def acquire(self) -> Slot:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        if self.active < self.max_concurrent and not self.waiting:
            self.active += 1
            return Slot(self)
        if self.waiting >= self.queue_size:
            self.refused += 1
            raise overloaded(f"the router has {self.active} requests at the workers and {self.waiting} waiting "
                             f"(--max-concurrent-requests {self.max_concurrent}, --queue-size {self.queue_size})")
        self.waiting += 1
        try:
            async with cond:
                await asyncio.wait_for(cond.wait_for(lambda: self.active < self.max_concurrent),
                                       self.timeout_secs)
                self.active += 1
        except asyncio.TimeoutError:
            self.refused += 1
            raise overloaded(f"no place at the workers within {self.timeout_secs:g} s (--queue-timeout-secs)") from None
        finally:
            self.waiting -= 1
        return Slot(self)

    def _release(self) -> None:
        self.active -= 1
        cond = self._cond
        if cond is not None:
            async def wake() -> None:
                async with cond:
                    cond.notify_all()

            # released outside the loop (shutdown): nobody is waiting
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(wake())
