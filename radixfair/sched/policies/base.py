"""The seam between the scheduler and a scheduling policy. Policies never touch tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixfair.cache.radix_cache import RadixCache
    from radixfair.sched.request import Req


class SchedulePolicy(ABC):
    """Orders the waiting queue and is told about every unit of service it may charge for.

    The scheduler calls, in this order for one prefill batch: `order(waiting)`, then for each
    candidate `may_admit(req)` and, when it admits one, `on_admit(req, extend_len, cached_len)`;
    after each decode step `on_decode(req, n_tokens)`; and `on_finish(req)` once per request.
    """

    name: str = "base"

    def on_arrival(self, req: Req) -> None:  # noqa: B027 - optional hook
        """A request joined the waiting queue (new, or retracted and re-queued)."""

    @abstractmethod
    def order(self, waiting: Sequence[Req]) -> list[Req]:
        """The waiting queue in the order the batch builder should try to admit it."""

    def bind(self, tree: RadixCache) -> None:  # noqa: B027
        """Called once by the scheduler: the radix tree that prefix-aware policies match against."""

    def may_admit(self, req: Req) -> bool:
        return True

    def refill(self, waiting: Sequence[Req]) -> bool:
        """Nothing could be admitted although requests wait. Return True after changing state so
        that another pass may admit something (DLPM: start a new deficit round)."""
        return False

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:  # noqa: B027
        """Prompt tokens of `req` entered a prefill batch: `extend_len` computed for the first time
        (retraction re-computation is never reported), `cached_len` served from the cache (non-zero
        only on the request's first admission). Called once per chunk of a chunked prompt."""

    def on_decode(self, req: Req, n_tokens: int) -> None:  # noqa: B027
        """`req` produced `n_tokens` output tokens."""

    def on_finish(self, req: Req) -> None:  # noqa: B027
        """`req` left the system (finished or aborted)."""
