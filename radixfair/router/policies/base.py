"""The seam between a router and its routing policy: what a policy sees of a request and of the
workers, and the calls it gets. Nothing here knows about HTTP, tensors or time sources: the HTTP
router and the simulator drive the same objects, each with its own clock (`RouteRequest.time`).

A router calls, for each request: `select(request, workers)` and, when it sends the request to the
chosen worker, `on_dispatch(request, worker)`; when the worker is done with it (or the request
failed, was aborted or timed out), exactly once, `on_finish(request, worker, usage)`. A policy that
holds requests back (`select` returned None: `global_vtc`) hands them out again through
`next_held(workers)`, which the router calls after every finish. The router counts each worker's
load itself (dispatches minus finishes, corrected by the worker's own report where it has one) and
passes it in every call as `WorkerView`s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from radixfair.cache.prefix_tree import TokenKey
from radixfair.metrics.service import charged_service
from radixfair.router.policies.config import RouterConfig


class NoHealthyWorkerError(RuntimeError):
    """There is no healthy worker to send a request to (the HTTP router answers 503)."""


class ClientLimitError(RuntimeError):
    """The policy already keeps state for `max_clients` clients, each of which has work in flight or
    owes service, so a new client cannot be admitted without forgiving a debt (the router answers 429)."""


@dataclass(frozen=True, eq=False)  # identity, not value: a policy keys its in-flight records by the object
class RouteRequest:
    """What a routing policy sees of a request."""

    client_id: str
    input_ids: TokenKey  # the prompt's token ids, as the workers' caches hold them
    max_new_tokens: int  # output tokens to expect (the request's cap: the router cannot know more)
    rid: str = ""
    weight: float = 1.0  # the client's share (from its API key)
    time: float = 0.0  # the router's clock, in seconds (virtual time in the simulator)

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, tuple):
            object.__setattr__(self, "input_ids", tuple(self.input_ids))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight!r}")

    def estimated_cost(self, cached_tokens: int, w_in: float, w_out: float) -> float:
        """What serving it will charge its client if `cached_tokens` of the prompt are cached."""
        return charged_service(len(self.input_ids) - cached_tokens, self.max_new_tokens, w_in, w_out)


@dataclass(frozen=True)
class WorkerView:
    """A worker as the router sees it when it decides."""

    worker_id: str
    requests: int = 0  # in flight: dispatched and not finished
    tokens: int = 0  # prompt + max_new_tokens of those requests
    healthy: bool = True

    @property
    def load(self) -> tuple[int, int]:
        """Requests first (sgl-router's measure, the one the balance thresholds count), tokens to
        break ties."""
        return self.requests, self.tokens


class Usage(NamedTuple):
    """What a finished request used, as the worker reports it (OpenAI's usage names)."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def cost(self, w_in: float, w_out: float) -> float:
        return charged_service(self.prompt_tokens - self.cached_tokens, self.completion_tokens, w_in, w_out)


class RouterPolicy(ABC):
    name: ClassVar[str] = "base"
    config_class: ClassVar[type[RouterConfig]] = RouterConfig

    def __init__(self, config: RouterConfig | None = None) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config: Any = config
        # how many decisions took each branch of the policy (the router's metrics show them)
        self.decisions: Counter[str] = Counter()

    @abstractmethod
    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView | None:
        """The worker (one of `workers`) to send `request` to, or None to hold it in the router
        (only a policy that overrides `next_held` may return None). Raises NoHealthyWorkerError
        when no worker is healthy."""

    def on_dispatch(self, request: RouteRequest, worker: WorkerView) -> None:  # noqa: B027 - optional hook
        """`request` was sent to `worker` (normally the one `select` chose)."""

    def on_finish(self, request: RouteRequest, worker: WorkerView, usage: Usage | None) -> None:  # noqa: B027
        """`worker` is done with `request`: `usage` as reported, or None when it failed before any
        service was delivered. Called exactly once per dispatch, on every path."""

    def next_held(self, workers: Sequence[WorkerView]) -> tuple[RouteRequest, WorkerView] | None:
        """A held request that may go now, and where; None when nothing may."""
        return None

    def remove_worker(self, worker_id: str) -> None:  # noqa: B027
        """`worker_id` left the fleet: drop what the policy keeps about it."""

    # what the fairness view (`/fairness`) shows of the policy's state
    balance_name: ClassVar[str] = ""  # "deficit" or "counter": what `balances` are; "" when none

    def balances(self) -> dict[str, float]:
        """Each client's fairness state, as one number (`balance_name`); {} for a policy without."""
        return {}

    def quantum(self) -> float | None:
        """The policy's quantum, for a policy that has one."""
        return None


def healthy(workers: Sequence[WorkerView]) -> list[WorkerView]:
    out = [w for w in workers if w.healthy]
    if not out:
        raise NoHealthyWorkerError(f"no healthy worker among {len(workers)}")
    return out


def least_loaded(workers: Sequence[WorkerView]) -> WorkerView:
    """Fewest requests in flight, then fewest tokens, then the first listed (deterministic)."""
    return min(workers, key=lambda w: w.load)
