"""`radixfair launch`: local worker processes (restarted when they die, all stopped on Ctrl-C) and
Ray actor workers, each behind a live router."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fixtures.live_server import LiveServer, free_port

from radixfair.engine_args import EngineArgs
from radixfair.router.app import create_router_app
from radixfair.router.launch import LaunchArgs, LocalFleet, split_threads
from radixfair.router.router_args import RouterArgs
from radixfair.router.serve import build_policy
from radixfair.router.state import RouterState
from radixfair.server.auth import ServerClient

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-launch-router"
KEYS = {KEY: ServerClient("router", trusted_proxy=True)}


def _engine(model: Path) -> EngineArgs:
    return EngineArgs(model=str(model), dtype="float32", max_total_tokens=2048, num_threads=1)


def _generate(url: str, client: str = "alice") -> httpx.Response:
    return httpx.post(url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                      headers={"x-client-id": client}, timeout=60)


def test_threads_are_split_between_workers() -> None:
    assert split_threads(EngineArgs(num_threads=8), 3).num_threads == 2
    assert split_threads(EngineArgs(num_threads=2), 4).num_threads == 1
    with pytest.raises(ValueError, match="--workers"):
        LaunchArgs(workers=0)


def test_local_fleet_restarts_a_dead_worker_and_stops_all(tiny_llama: Path) -> None:
    fleet = LocalFleet(2, _engine(tiny_llama), KEYS)
    try:
        urls = fleet.start()
        state = RouterState(RouterArgs(worker_urls=tuple(urls), worker_api_key=KEY), build_policy("round_robin", {}))
        router = LiveServer(create_router_app(state))
        try:
            assert _generate(router.url).status_code == 200
            # the workers take only the router's key
            assert _generate(urls[0]).status_code == 401
            first = fleet.procs[0]
            first.kill()
            deadline = time.monotonic() + 120
            while fleet.restarts[0] == 0 or not _up(urls[0]):
                assert time.monotonic() < deadline, "the dead worker was not restarted"
                time.sleep(0.2)
            assert fleet.procs[0] is not first
            for _ in range(4):  # both workers serve again, the restarted one at its old address
                assert _generate(router.url).status_code == 200
            assert all(w.failed == 0 or w.url == urls[0] for w in state.workers.values())
        finally:
            router.stop()
    finally:
        fleet.stop()
    assert not any(p.is_alive() for p in fleet.procs)
    assert not any(_up(u) for u in fleet.urls)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_launch_command_serves_and_ctrl_c_stops_everything(tiny_llama: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "radixfair.cli", "launch", "--workers", "2", "--model", str(tiny_llama),
         "--dtype", "float32", "--max-total-tokens", "2048", "--port", str(port), "--policy", "cache_aware"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any("router (cache_aware)" in x for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        assert f"at {url}" in "".join(lines)
        deadline = time.monotonic() + 30
        while not _up(url):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _generate(url).status_code == 200
        workers = [w["url"] for w in httpx.get(url + "/workers", timeout=10).json()["workers"]]
        assert len(workers) == 2 and all(_up(w) for w in workers)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines)
        assert not _up(url) and not any(_up(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install radixfair[ray])")
def test_ray_actor_workers_behind_the_router(tiny_llama: Path) -> None:
    import ray

    from radixfair.router.ray_workers import RayFleet

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    fleet = RayFleet(LaunchArgs(workers=2, ray=True), _engine(tiny_llama), KEYS)
    try:
        urls = fleet.start()
        assert len(set(urls)) == 2
        state = RouterState(RouterArgs(worker_urls=tuple(urls), worker_api_key=KEY), build_policy("d2lpm", {}))
        router = LiveServer(create_router_app(state))
        try:
            for i in range(4):
                assert _generate(router.url, f"c{i}").status_code == 200
            assert sum(w.dispatched for w in state.workers.values()) == 4
            assert state.in_flight() == 0
        finally:
            router.stop()
    finally:
        fleet.stop()
        if ray.is_initialized():
            ray.shutdown()
