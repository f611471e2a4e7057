"""The seam between the scheduler and a scheduling policy. Policies never touch tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

    def may_admit(self, req: Req) -> bool:
        return True

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:  # noqa: B027
        """`req` was admitted to a prefill batch; `extend_len` tokens will be computed."""

    def on_decode(self, req: Req, n_tokens: int) -> None:  # noqa: B027
        """`req` produced `n_tokens` output tokens."""

    def on_finish(self, req: Req) -> None:  # noqa: B027
        """`req` left the system (finished or aborted)."""
