"""First come, first served."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from radixfair.sched.policies.base import SchedulePolicy

if TYPE_CHECKING:
    from radixfair.sched.request import Req


class FCFSPolicy(SchedulePolicy):
    name = "fcfs"

    def order(self, waiting: Sequence[Req]) -> list[Req]:
        return sorted(waiting, key=lambda r: (r.arrival_time, r.arrival_seq))
