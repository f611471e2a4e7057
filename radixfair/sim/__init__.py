"""Discrete-event simulation of radixfair workers: the real scheduler, policies and radix cache,
batch times from a cost model, virtual time. No torch: it runs anywhere, thousands of requests in seconds."""

from radixfair.sim.cost_model import CostModel, available_profiles, load_profile
from radixfair.sim.simulator import SIM_SCHEDULER, SimConfig, SimResult, Simulator, SimWorker
from radixfair.sim.trace import TraceRecord, read_jsonl, write_jsonl

__all__ = [
    "SIM_SCHEDULER",
    "CostModel",
    "SimConfig",
    "SimResult",
    "SimWorker",
    "Simulator",
    "TraceRecord",
    "available_profiles",
    "load_profile",
    "read_jsonl",
    "write_jsonl",
]
