"""Scheduling policies: order the waiting queue and account per-client service."""

from radixfair.sched.policies.base import DEFAULT_DLPM_QUANTUM, PolicyConfig, SchedulePolicy
from radixfair.sched.policies.dfs_weight import DFSWeightPolicy
from radixfair.sched.policies.dlpm import DLPMPolicy
from radixfair.sched.policies.fcfs import FCFSPolicy
from radixfair.sched.policies.lpm import LPMPolicy
from radixfair.sched.policies.vtc import VTCPolicy

POLICIES: dict[str, type[SchedulePolicy]] = {
    "fcfs": FCFSPolicy,
    "lpm": LPMPolicy,
    "dfs-weight": DFSWeightPolicy,
    "vtc": VTCPolicy,
    "dlpm": DLPMPolicy,
}
DEFAULT_POLICY = "dlpm"


def make_policy(name: str, config: PolicyConfig | None = None) -> SchedulePolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return cls(config)


__all__ = [
    "DEFAULT_DLPM_QUANTUM",
    "DEFAULT_POLICY",
    "POLICIES",
    "PolicyConfig",
    "SchedulePolicy",
    "make_policy",
]
