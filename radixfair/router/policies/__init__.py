"""Routing policies: which worker serves a request. Plain objects (no HTTP, no torch) shared by the
HTTP router and the multi-worker simulator; see `base.py` for the calls a router makes."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from radixfair.router.policies.base import (
    ClientLimitError,
    NoHealthyWorkerError,
    RouteRequest,
    RouterPolicy,
    Usage,
    WorkerView,
)
from radixfair.router.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from radixfair.router.policies.config import RouterConfig
from radixfair.router.policies.d2lpm import D2LPMConfig, D2LPMPolicy
from radixfair.router.policies.global_vtc import GlobalVTCConfig, GlobalVTCPolicy
from radixfair.router.policies.least_load import LeastLoadConfig, LeastLoadPolicy
from radixfair.router.policies.power_of_two import PowerOfTwoConfig, PowerOfTwoPolicy
from radixfair.router.policies.round_robin import RoundRobinConfig, RoundRobinPolicy

ROUTER_POLICIES: dict[str, type[RouterPolicy]] = {
    "round_robin": RoundRobinPolicy,
    "least_load": LeastLoadPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "cache_aware": CacheAwarePolicy,
    "d2lpm": D2LPMPolicy,
    "global_vtc": GlobalVTCPolicy,
}
DEFAULT_ROUTER_POLICY = "d2lpm"
_ALIASES = {"round-robin": "round_robin"}  # the simulator's spelling before these policies existed

# The scheduling policy each router policy's workers run, as in the D²LPM paper's baselines: D²LPM's
# second deficit is DLPM in every worker, the fairness-only baseline is VTC all the way down, and the
# locality and load baselines run SGLang's default, LPM.
WORKER_POLICIES: dict[str, str] = {"d2lpm": "dlpm", "global_vtc": "vtc"}


def canonical_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in ROUTER_POLICIES:
        raise ValueError(f"unknown router policy {name!r}; choose from {', '.join(ROUTER_POLICIES)}")
    return name


def worker_policy(name: str) -> str:
    """The scheduling policy the workers behind router policy `name` run."""
    return WORKER_POLICIES.get(canonical_name(name), "lpm")


def make_router_policy(name: str, config: RouterConfig | None = None) -> RouterPolicy:
    return ROUTER_POLICIES[canonical_name(name)](config)


def router_config(name: str, values: Mapping[str, Any]) -> RouterConfig:
    """Router policy `name`'s config from a flat mapping of settings, such as the parsed flags of
    every policy's config: the settings it does not have are left out."""
    cls = ROUTER_POLICIES[canonical_name(name)].config_class
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


__all__ = [
    "DEFAULT_ROUTER_POLICY",
    "ROUTER_POLICIES",
    "WORKER_POLICIES",
    "CacheAwareConfig",
    "CacheAwarePolicy",
    "ClientLimitError",
    "D2LPMConfig",
    "D2LPMPolicy",
    "GlobalVTCConfig",
    "GlobalVTCPolicy",
    "LeastLoadConfig",
    "LeastLoadPolicy",
    "NoHealthyWorkerError",
    "PowerOfTwoConfig",
    "PowerOfTwoPolicy",
    "RoundRobinConfig",
    "RoundRobinPolicy",
    "RouteRequest",
    "RouterConfig",
    "RouterPolicy",
    "Usage",
    "WorkerView",
    "canonical_name",
    "make_router_policy",
    "router_config",
    "worker_policy",
]
