"""Longest prefix match: the request with the most cached prompt tokens first, ties by arrival.

Exact at any queue length: the matches come from a `PrefixIndex` that the tree keeps current, so
ordering is a list copy rather than re-matching and sorting the whole queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from radixfair.sched.policies.base import PolicyConfig, SchedulePolicy
from radixfair.sched.prefix_index import PrefixIndex

if TYPE_CHECKING:
    from radixfair.cache.prefix_tree import PrefixTree, TreeNode
    from radixfair.sched.request import Req


class PrefixAwarePolicy(SchedulePolicy):
    """Keeps every waiting request in a prefix index over the scheduler's tree."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self.index = PrefixIndex()

    def bind(self, tree: PrefixTree) -> None:
        self.index.bind(tree)

    def on_arrival(self, req: Req) -> None:
        self.index.add(req)

    def cached_prefix(self, req: Req, tree: PrefixTree) -> tuple[TreeNode, int] | None:
        return self.index.anchor(req, tree)

    def on_dequeue(self, req: Req) -> None:
        self.index.remove(req)

    def on_finish(self, req: Req) -> None:
        self.index.remove(req)  # aborted while waiting

    def _lpm_order(self, waiting: Sequence[Req]) -> list[Req]:
        if len(waiting) != len(self.index):
            # cheap guard: a queue change the policy was not told about would silently lose requests
            raise RuntimeError(
                f"{self.name}: {len(waiting)} requests wait but {len(self.index)} are indexed; "
                "the scheduler must report every queue change (on_arrival/on_dequeue/on_finish)"
            )
        return self.index.ordered()


class LPMPolicy(PrefixAwarePolicy):
    name = "lpm"

    def order(self, waiting: Sequence[Req]) -> list[Req]:
        return self._lpm_order(waiting)
