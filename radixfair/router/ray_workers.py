"""`radixfair launch --ray`: each worker a Ray actor. Ray places the actors (one GPU each where the
cluster has GPUs), restarts one whose process dies (`max_restarts`) and tells us when it cannot;
this module only starts them, asks each for its address, and keeps the router's worker list in
step when a restarted actor comes back at another address."""

from __future__ import annotations

import logging
import threading
from typing import Any

from radixfair.engine_args import EngineArgs
from radixfair.router.launch import Fleet, LaunchArgs, WorkerSpec, wait_healthy
from radixfair.server.auth import ServerClient
from radixfair.server.server_args import ServerArgs

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_SECS = 2.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ValueError("--ray needs Ray: pip install 'radixfair[ray]'") from e
    return ray


class WorkerActor:
    """One worker inside a Ray actor: the engine and its HTTP server, on this node's address."""

    def __init__(self, spec: WorkerSpec) -> None:
        import socket

        import ray
        import uvicorn

        from radixfair.engine.engine import Engine
        from radixfair.server.app import create_app
        from radixfair.server.connections import uvicorn_config

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self._url = f"http://{host}:{port}"
        self.engine = Engine(args=spec.engine)
        opts = ServerArgs(host=host, port=port)
        app = create_app(self.engine, spec.keys, opts)
        self.server = uvicorn.Server(uvicorn_config(app, opts, log_level=spec.log_level))
        self.thread = threading.Thread(target=self.server.run, name="radixfair-worker", daemon=True)
        self.thread.start()

    def url(self) -> str:
        return self._url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


class RayFleet(Fleet):
    def __init__(self, launch: LaunchArgs, engine: EngineArgs, keys: dict[str, ServerClient],
                 log_level: str = "warning") -> None:
        self.ray = _import_ray()
        self.launch = launch
        self.spec = WorkerSpec(engine, ServerArgs(), keys, log_level)
        self.actors: list[Any] = []
        self.urls: list[str] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_ray = False

    def start(self) -> list[str]:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.launch.address)
            self._started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0)
        per_worker: dict[str, Any] = {"num_gpus": 1} if gpus >= self.launch.workers else \
            {"num_cpus": max(self.spec.engine.num_threads or 1, 1)}
        # a dead actor is rebuilt by Ray, with the same spec: a new engine at a new address
        cls = ray.remote(max_restarts=-1, max_task_retries=-1, **per_worker)(WorkerActor)
        self.actors = [cls.remote(self.spec) for _ in range(self.launch.workers)]
        self.urls = ray.get([a.url.remote() for a in self.actors])
        print(f"radixfair: {len(self.actors)} Ray actor workers at {', '.join(self.urls)}", flush=True)
        wait_healthy(self.urls, lambda: True)
        return list(self.urls)

    def follow(self, state: Any) -> None:
        def loop() -> None:
            while not self._stopping.wait(FOLLOW_INTERVAL_SECS):
                self.sync(state)

        self._thread = threading.Thread(target=loop, name="radixfair-ray-follow", daemon=True)
        self._thread.start()

    def sync(self, state: Any) -> None:
        """Point the router at each actor's current address (a restarted actor has a new one).
        The router's own loop owns `state`: the change is made there."""
        for i, actor in enumerate(self.actors):
            try:
                url = self.ray.get(actor.url.remote(), timeout=10)
            except Exception as e:  # an actor being restarted answers later
                logger.info("ray worker %d: no address yet (%s)", i, e)
                continue
            if url != self.urls[i]:
                old, self.urls[i] = self.urls[i], url
                logger.warning("ray worker %d moved from %s to %s", i, old, url)
                state.replace_worker(old, url)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        ray = self.ray
        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=20)
            except Exception as e:  # already gone
                logger.info("ray worker stop: %s", e)
            ray.kill(a, no_restart=True)
        if self._started_ray:
            ray.shutdown()
