"""DFS-weight (SGLang's `dfs-weight`): keep requests that share cached prefixes together.

weight(node) = waiting requests whose match ends at the node + the weights of its children. A
depth-first walk visits heavier children first and emits a node's own requests after its subtree,
as SGLang does, so requests with deeper matches under the same prefix go first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from radixfair.sched.policies.lpm import PrefixAwarePolicy

if TYPE_CHECKING:
    from radixfair.cache.radix_cache import TreeNode
    from radixfair.sched.request import Req


class DFSWeightPolicy(PrefixAwarePolicy):
    name = "dfs-weight"

    def order(self, waiting: Sequence[Req]) -> list[Req]:
        self._lpm_order(waiting)  # the same bookkeeping guard as LPM
        own: dict[TreeNode, list[tuple[int, Req]]] = dict(self.index.anchors())
        weight: dict[TreeNode, int] = {}
        for node, reqs in own.items():
            walker: TreeNode | None = node
            while walker is not None:
                weight[walker] = weight.get(walker, 0) + len(reqs)
                walker = walker.parent
        out: list[Req] = []
        if not weight:
            return out
        root = next(iter(weight))
        while root.parent is not None:
            root = root.parent
        # iterative post-order: a deep tree must not hit Python's recursion limit
        stack: list[tuple[TreeNode, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                # SGLang's matching splits the edge where a match ends, so a shorter match there
                # sits on a node above this one and comes later in post-order: deepest first.
                mine = own.get(node, [])
                mine.sort(key=lambda p: (-p[0], p[1].arrival_time, p[1].arrival_seq))
                out.extend(r for _, r in mine)
                continue
            stack.append((node, True))
            kids = [c for c in node.children.values() if c in weight]
            kids.sort(key=lambda c: (-weight[c], c.node_id))
            stack.extend((c, False) for c in reversed(kids))
        return out
