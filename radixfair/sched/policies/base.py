"""The seam between the scheduler and a scheduling policy. Policies never touch tensors."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixfair.metrics.service import W_IN, W_OUT

if TYPE_CHECKING:
    from radixfair.cache.prefix_tree import PrefixTree, TreeNode
    from radixfair.sched.request import Req


# More than one long-document prompt (twice the default chunk size), so a client that pays to load a
# document gets to use it within the same round. README, "The quantum", derives it from
# `radixfair bench sim --scenario quantum-sweep`.
DEFAULT_DLPM_QUANTUM = 4096
# Per-client state a fair policy keeps; past it, idle clients that owe nothing are forgotten, and new
# clients share one overflow client while every slot holds a client that is busy or owes service.
DEFAULT_MAX_CLIENTS = 10000
OVERFLOW_CLIENT = "_overflow"


@dataclass(frozen=True)
class PolicyConfig:
    """Costs are in tokens: `w_in` per uncached prompt token, `w_out` per output token."""

    w_in: float = W_IN
    w_out: float = W_OUT
    dlpm_quantum: float = DEFAULT_DLPM_QUANTUM
    # client id -> weight (share of service); absent clients use their requests' `weight` (1.0)
    client_weights: Mapping[str, float] = field(default_factory=dict)
    max_clients: int = DEFAULT_MAX_CLIENTS
    # vtc and dlpm guarantee each active client its weighted share of the batch's rows (see
    # ClientBook.within_batch_share); False leaves the deficits or counters alone to decide
    row_share: bool = True

    def __post_init__(self) -> None:
        for name in ("w_in", "w_out"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.w_in == 0 and self.w_out == 0:
            raise ValueError("w_in and w_out are both 0: no service would ever be charged")
        if not isinstance(self.max_clients, int) or self.max_clients < 1:
            raise ValueError(f"max_clients must be an integer >= 1, got {self.max_clients!r}")
        if not (math.isfinite(self.dlpm_quantum) and self.dlpm_quantum > 0):
            raise ValueError(f"dlpm_quantum must be a finite number > 0, got {self.dlpm_quantum!r}")
        for client, w in self.client_weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"the weight of client {client!r} must be a finite number > 0, got {w!r}")
        # a private copy: the caller's dict must not change the weights under a running policy
        object.__setattr__(self, "client_weights", dict(self.client_weights))

    def weight(self, req: Req) -> float:
        """A configured client weight wins over the one its request carries."""
        w = self.client_weights.get(req.client_id)
        return req.weight if w is None else w

    def weight_of(self, client_id: str) -> float:
        return self.client_weights.get(client_id, 1.0)


class SchedulePolicy(ABC):
    """Orders the waiting queue and is told about every unit of service it may charge for.

    The scheduler calls, in this order for one prefill batch: `order(waiting)`, then for each
    candidate `may_admit(req)` and, when it admits one, `on_admit(req, extend_len, cached_len)`;
    `refill(waiting)` when a pass admitted nothing; after the batch is formed `on_dequeue(req)` for
    each request it took out of the waiting queue; after each decode step `on_decode(req, n_tokens)`;
    and `on_finish(req)` once per request. A request re-enters through `on_arrival` when retracted.
    """

    name: str = "base"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    def on_arrival(self, req: Req) -> None:  # noqa: B027 - optional hook
        """A request joined the waiting queue (new, or retracted and re-queued)."""

    def client_for(self, client_id: str) -> str:
        """The client a new request is scheduled as, asked before its `on_arrival`: itself, unless the
        policy's per-client state is full (`PolicyConfig.max_clients`), when it may be another."""
        return client_id

    def retract_victim(self, running: Sequence[Req]) -> Req:
        """The running request to send back to the queue when the KV pool runs out: by default the
        newest. A fair policy picks from the client furthest over its share."""
        return newest(running)

    @abstractmethod
    def order(self, waiting: Sequence[Req]) -> Iterable[Req]:
        """The waiting queue in the order the batch builder should try to admit it. May be lazy: it
        is consumed once, within one admission pass, interleaved with may_admit/on_admit calls (so
        an order can react to what the pass already admitted, as VTC's does)."""

    def bind(self, tree: PrefixTree) -> None:  # noqa: B027
        """The radix tree that prefix-aware policies match against; called by the scheduler when it
        starts, and again if its tree is ever replaced."""

    def set_batch_slots(self, max_running_requests: int) -> None:  # noqa: B027
        """How many requests the running batch holds; called by the scheduler when it starts (the
        fair policies give each client a weighted share of those rows)."""

    def may_admit(self, req: Req) -> bool:
        return True

    def cached_prefix(self, req: Req, tree: PrefixTree) -> tuple[TreeNode, int] | None:
        """Where the longest cached prefix of the waiting `req` ends in `tree` (node, tokens into its
        edge), if the policy tracks it; the scheduler then admits `req` without re-matching it."""
        return None

    def refill(self, waiting: Sequence[Req]) -> bool:
        """Nothing could be admitted although requests wait. Return True after changing state so
        that another pass may admit something (DLPM: start a new deficit round)."""
        return False

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:  # noqa: B027
        """Prompt tokens of `req` entered a prefill batch: `extend_len` computed for the first time
        (retraction re-computation is never reported), `cached_len` served from the cache (non-zero
        only on the request's first admission). Called once per chunk of a chunked prompt."""

    def on_dequeue(self, req: Req) -> None:  # noqa: B027
        """`req` left the waiting queue to run (its first chunk, or all of it, was admitted)."""

    def on_decode(self, req: Req, n_tokens: int) -> None:  # noqa: B027
        """`req` produced `n_tokens` output tokens."""

    def on_finish(self, req: Req) -> None:  # noqa: B027
        """`req` left the system (finished or aborted)."""

    def balances(self) -> tuple[str, Mapping[str, float]]:
        """The per-client state a fair policy schedules by, for operators to see: its name
        ("deficit", "counter") and client -> value; ("", {}) for a policy that keeps none."""
        return "", {}


def newest(reqs: Iterable[Req]) -> Req:
    return max(reqs, key=lambda r: (r.arrival_time, r.arrival_seq))


def newest_of_most_served(running: Sequence[Req], over: Callable[[str], float]) -> Req:
    """The newest request of the client with the largest `over(client)` (how far it is over its
    share) among the clients with running requests."""
    worst = max({r.client_id for r in running}, key=over)
    return newest(r for r in running if r.client_id == worst)
