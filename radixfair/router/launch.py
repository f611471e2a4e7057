"""`radixfair launch`: N workers and a router in front of them, in one command.

Locally (default), each worker is a process of its own (`radixfair serve`'s code, the machine's
threads split between them) on a free 127.0.0.1 port; a supervisor thread restarts a worker that
dies, and Ctrl-C stops the router and then every worker. With `--ray`, each worker is a Ray actor
(`ray_workers.py`) and Ray does the placement, restarts and health; the router follows the actors'
addresses. Either way the workers accept only the router's key (a trusted proxy, made up at launch),
so the clients the router names are the ones their fair schedulers see.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from radixfair.config_flags import add_flags, flag, flag_values
from radixfair.engine_args import EngineArgs
from radixfair.router.router_args import RouterArgs
from radixfair.server.auth import ServerClient
from radixfair.server.server_args import ServerArgs

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_SECS = 900.0  # a large model loads for minutes
RESTART_DELAY_SECS = 1.0


@dataclass(frozen=True)
class LaunchArgs:
    workers: int = flag(2, "worker processes (or Ray actors) to start")
    ray: bool = flag(False, "place each worker as a Ray actor (pip install radixfair[ray]); one GPU each where the "
                            "cluster has GPUs")
    address: str | None = flag(None, "--ray: the Ray cluster to join (ray.init's address)",
                               none_means="a local Ray started for this launch")

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be an integer >= 1, got {self.workers!r}")


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker is started with (picklable: it crosses to a process or a Ray actor)."""

    engine: EngineArgs
    server: ServerArgs
    keys: dict[str, ServerClient]
    log_level: str = "warning"


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "flag" in f.metadata]


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The launch's, the engine's, then the router's flags (a setting both have, such as --w-in or
    --tokenizer-path, is one flag that goes to both) and the routing policies'."""
    from radixfair.router.serve import add_policy_flags

    add_flags(p, LaunchArgs)
    add_flags(p.add_argument_group("engine (every worker)"), EngineArgs)
    engine = set(_names(EngineArgs))
    add_flags(p.add_argument_group("router"), RouterArgs,
              only=[n for n in _names(RouterArgs) if n not in engine and n != "worker_urls"])
    add_policy_flags(_Skipping(p.add_argument_group("routing policy"), engine))


class _Skipping:
    """An argument group that leaves out flags already added (by their dest)."""

    def __init__(self, group: Any, skip: set[str]) -> None:
        self.group = group
        self.skip = skip

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        if kwargs.get("dest") in self.skip:
            return None
        return self.group.add_argument(*names, **kwargs)

    def add_mutually_exclusive_group(self, *, required: bool = False) -> Any:
        return self.group.add_mutually_exclusive_group(required=required)


def split_threads(args: EngineArgs, workers: int) -> EngineArgs:
    """Each worker's torch threads: the machine's (or --num-threads) shared out, at least one."""
    total = args.num_threads or os.cpu_count() or 1
    return replace(args, num_threads=max(total // workers, 1))


def cmd_launch(ns: argparse.Namespace) -> int:
    from radixfair.cli import load_api_keys
    from radixfair.router.serve import build_policy, policy_values

    launch = LaunchArgs(**flag_values(LaunchArgs, ns))
    engine = split_threads(EngineArgs(**flag_values(EngineArgs, ns)), launch.workers)
    router_key = secrets.token_urlsafe(24)
    router_values = flag_values(RouterArgs, ns, only=[n for n in _names(RouterArgs) if n != "worker_urls"])
    args = RouterArgs(**{**router_values, "worker_api_key": router_key})
    policy = build_policy(args.policy, policy_values(ns))
    keys = load_api_keys(args)
    # the workers' own policy follows the router's (d2lpm's second deficit is dlpm in each worker),
    # unless --schedule-policy was given
    if engine.schedule_policy == EngineArgs.schedule_policy:
        from radixfair.router.policies import worker_policy

        engine = replace(engine, schedule_policy=worker_policy(args.policy))
    if keys:
        weights = {c.client: c.weight for c in keys.values() if c.weight != 1.0}
        engine = replace(engine, client_weights={**weights, **engine.client_weights})
    worker_keys = {router_key: ServerClient("router", trusted_proxy=True)}
    if launch.ray:
        from radixfair.router.ray_workers import RayFleet

        fleet: Fleet = RayFleet(launch, engine, worker_keys, ns.log_level)
    else:
        fleet = LocalFleet(launch.workers, engine, worker_keys, ns.log_level)
    try:
        urls = fleet.start()
        args = replace(args, worker_urls=tuple(urls))
        return _serve_router(args, policy, keys, fleet, ns.log_level)
    finally:
        fleet.stop()


def _serve_router(args: RouterArgs, policy: Any, keys: Any, fleet: Fleet, log_level: str) -> int:
    from radixfair.router.serve import run_router

    return run_router(args, policy, keys, log_level, on_state=fleet.follow)


class Fleet(ABC):
    """Workers the launch owns."""

    @abstractmethod
    def start(self) -> list[str]:
        """Start them; their URLs once each answers /health."""

    def follow(self, state: Any) -> None:  # noqa: B027 - optional
        """Keep `state`'s workers in step with the fleet (a worker that came back elsewhere)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop them all."""


def wait_healthy(urls: Sequence[str], alive: Callable[[], bool], timeout: float = WORKER_START_TIMEOUT_SECS) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        if not alive():
            raise RuntimeError("a worker exited while starting; see its log above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not start within {timeout:g} s: {', '.join(pending)}")
        still = []
        for url in pending:
            try:
                ok = httpx.get(url + "/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                still.append(url)
        pending = still
        if pending:
            time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_worker(spec: WorkerSpec) -> None:
    """A worker process's body."""
    import sys

    from radixfair.cli import serve, setup_logging

    # out of the terminal's process group: Ctrl-C reaches the launcher alone, which stops the
    # router first and then the workers (a worker that left on its own would be restarted)
    os.setpgrp()
    setup_logging(spec.log_level)
    sys.exit(serve(spec.server, spec.keys, spec.engine, spec.log_level))


class LocalFleet(Fleet):
    def __init__(self, n: int, engine: EngineArgs, keys: dict[str, ServerClient], log_level: str = "warning") -> None:
        self.specs = [WorkerSpec(engine, ServerArgs(port=_free_port()), keys, log_level) for _ in range(n)]
        self.urls = [f"http://127.0.0.1:{s.server.port}" for s in self.specs]
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
        self.procs: list[Any] = [None] * n
        self.restarts = [0] * n
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def _spawn(self, i: int) -> None:
        p = self._ctx.Process(target=run_worker, args=(self.specs[i],), name=f"radixfair-worker-{i}", daemon=False)
        p.start()
        self.procs[i] = p

    def start(self) -> list[str]:
        for i in range(len(self.specs)):
            self._spawn(i)
        print(f"radixfair: starting {len(self.specs)} workers ({self.specs[0].engine.num_threads} threads each) at "
              f"{', '.join(self.urls)}", flush=True)
        wait_healthy(self.urls, lambda: all(p.is_alive() for p in self.procs))
        self._watch = threading.Thread(target=self._supervise, name="radixfair-supervisor", daemon=True)
        self._watch.start()
        return list(self.urls)

    def _supervise(self) -> None:
        while not self._stopping.wait(RESTART_DELAY_SECS):
            for i, p in enumerate(self.procs):
                if p is not None and not p.is_alive() and not self._stopping.is_set():
                    self.restarts[i] += 1
                    logger.warning("worker %s exited (code %s); restarting it (restart %d)", self.urls[i],
                                   p.exitcode, self.restarts[i])
                    print(f"radixfair: worker {self.urls[i]} exited (code {p.exitcode}); restarting it", flush=True)
                    self._spawn(i)

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.join(timeout=5)
        for p in self.procs:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: the worker shuts down cleanly
        deadline = time.monotonic() + 15
        for p in self.procs:
            if p is not None:
                p.join(timeout=max(deadline - time.monotonic(), 0.1))
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
