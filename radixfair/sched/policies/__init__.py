"""Scheduling policies: order the waiting queue and account per-client service."""

from radixfair.sched.policies.base import SchedulePolicy
from radixfair.sched.policies.fcfs import FCFSPolicy

POLICIES: dict[str, type[SchedulePolicy]] = {"fcfs": FCFSPolicy}


def make_policy(name: str) -> SchedulePolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "SchedulePolicy", "make_policy"]
