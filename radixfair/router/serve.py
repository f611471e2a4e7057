"""`radixfair router`: flags (the router's and every routing policy's, each declared once in its
config) and running the service."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from radixfair.config_flags import add_flags, flag_values
from radixfair.router.policies import ROUTER_POLICIES, RouterPolicy, make_router_policy, router_config
from radixfair.router.router_args import RouterArgs
from radixfair.router.state import RouterState
from radixfair.server.auth import ServerClient


def _policy_config_classes() -> list[type]:
    return list(dict.fromkeys(cls.config_class for cls in ROUTER_POLICIES.values()))


def _flag_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "flag" in f.metadata]


def add_policy_flags(p: Any) -> None:
    """Every routing policy's settings, one flag each (a setting two policies share is one flag)."""
    seen: set[str] = set()
    for cls in _policy_config_classes():
        names = [n for n in _flag_names(cls) if n not in seen]
        if names:
            add_flags(p, cls, only=names)
            seen |= set(names)


def policy_values(ns: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for cls in _policy_config_classes():
        values.update(flag_values(cls, ns, only=[n for n in _flag_names(cls) if hasattr(ns, n)]))
    return values


def add_router_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, RouterArgs)
    add_policy_flags(p.add_argument_group("routing policy"))


def router_args(ns: argparse.Namespace) -> RouterArgs:
    return RouterArgs(**flag_values(RouterArgs, ns))


def build_policy(name: str, values: Mapping[str, Any]) -> RouterPolicy:
    return make_router_policy(name, router_config(name, values))


def run_router(args: RouterArgs, policy: RouterPolicy, keys: Mapping[str, ServerClient] | None,
               log_level: str = "warning", on_state: Callable[[RouterState], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM. `on_state` sees the router's state before it serves (`launch`
    hands it to the fleet, which swaps in a restarted worker's new address)."""
    import uvicorn

    from radixfair.router.app import create_router_app

    state = RouterState(args, policy, keys)
    if on_state is not None:
        on_state(state)
    app = create_router_app(state)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"radixfair: router ({policy.name}) over {len(state.workers)} worker(s) at http://{host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
    return 0


def cmd_router(ns: argparse.Namespace) -> int:
    from radixfair.cli import load_api_keys

    args = router_args(ns)
    policy = build_policy(args.policy, policy_values(ns))
    return run_router(args, policy, load_api_keys(args), ns.log_level)
