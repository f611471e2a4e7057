"""A policy wrapper that adds up the service each client is charged, for benchmarks and tests.

Service is counted per unit of client weight: `w_in` per prompt token computed for the first time
and `w_out` per output token, as DLPM charges it; with `charge_cached` (default: only for VTC, which
charges that way) cached prompt tokens count too. Every hook is passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from radixfair.metrics.service import charged_service
from radixfair.sched.policies.base import SchedulePolicy

if TYPE_CHECKING:
    from radixfair.cache.prefix_tree import PrefixTree, TreeNode
    from radixfair.sched.request import Req


class MeteredPolicy(SchedulePolicy):
    def __init__(self, inner: SchedulePolicy, charge_cached: bool | None = None) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name
        self.service: dict[str, float] = {}
        self._charge_cached = inner.name == "vtc" if charge_cached is None else charge_cached

    def bind(self, tree: PrefixTree) -> None:
        self.inner.bind(tree)

    def set_batch_slots(self, max_running_requests: int) -> None:
        self.inner.set_batch_slots(max_running_requests)

    def on_arrival(self, req: Req) -> None:
        self.inner.on_arrival(req)

    def client_for(self, client_id: str) -> str:
        return self.inner.client_for(client_id)

    def retract_victim(self, running: Sequence[Req]) -> Req:
        return self.inner.retract_victim(running)

    def order(self, waiting: Sequence[Req]) -> Iterable[Req]:
        return self.inner.order(waiting)

    def may_admit(self, req: Req) -> bool:
        return self.inner.may_admit(req)

    def cached_prefix(self, req: Req, tree: PrefixTree) -> tuple[TreeNode, int] | None:
        return self.inner.cached_prefix(req, tree)

    def refill(self, waiting: Sequence[Req]) -> bool:
        return self.inner.refill(waiting)

    def on_admit(self, req: Req, extend_len: int, cached_len: int) -> None:
        n = extend_len + cached_len if self._charge_cached else extend_len
        self._charge(req, charged_service(n, 0, self.config.w_in, self.config.w_out))
        self.inner.on_admit(req, extend_len, cached_len)

    def on_dequeue(self, req: Req) -> None:
        self.inner.on_dequeue(req)

    def on_decode(self, req: Req, n_tokens: int) -> None:
        self._charge(req, charged_service(0, n_tokens, self.config.w_in, self.config.w_out))
        self.inner.on_decode(req, n_tokens)

    def on_finish(self, req: Req) -> None:
        self.inner.on_finish(req)

    def balances(self) -> tuple[str, Mapping[str, float]]:
        return self.inner.balances()

    def _charge(self, req: Req, amount: float) -> None:
        u = req.client_id
        self.service[u] = self.service.get(u, 0.0) + amount / self.config.weight(req)
