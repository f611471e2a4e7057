"""Every waiting request's longest cached prefix, kept exact as the radix tree changes.

SGLang re-matches every waiting request against the tree before each LPM sort and gives up (falls
back to FCFS) past 128 waiting requests because of it. A request's match can only change when the
tree changes right where the match ends, so this index anchors each request at that spot and listens
to the tree (`PrefixTree.add_listener`):

- a new leaf under node P extends exactly the requests that fully matched P and whose next token
  starts the leaf (kept per P, keyed by that token, so finding them is one dict lookup);
- a split moves the requests whose match ends inside the split edge to the upper or lower half;
- an evicted leaf hands its requests to its parent with shorter matches;
- a reset sends everyone to the root.

Matching is read-only here (no splits, no access-time refresh): ordering the queue must not change
the cache. The requests are also kept sorted by (longest match, arrival), so an LPM order is a list
copy instead of a sort.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from radixfair.cache.prefix_tree import PrefixTree, TreeNode

if TYPE_CHECKING:
    from radixfair.sched.request import Req

SortKey = tuple[int, float, int, int]


class _Entry:
    __slots__ = ("key", "matched", "node", "offset", "req", "sort_key", "uid")

    def __init__(self, req: Req, key: tuple[int, ...], uid: int) -> None:
        self.req = req
        self.key = key
        self.uid = uid
        self.node: TreeNode | None = None
        self.matched = 0  # tokens of `key` the tree holds
        self.offset = 0  # of which inside `node`'s edge (len(node.key) when the match ends at its end)
        self.sort_key: SortKey = (0, 0.0, 0, 0)  # see PrefixIndex._keys


class PrefixIndex:
    """Matched prefix lengths of a set of requests against one radix tree, and their LPM order."""

    def __init__(self) -> None:
        self._tree: PrefixTree | None = None
        self._entries: dict[Req, _Entry] = {}
        # Matches that end exactly at a node's end, by the next token they want: only a new child
        # with that first token can extend them.
        self._open: dict[TreeNode, dict[int, set[_Entry]]] = {}
        # Matches that end inside a node's edge, or that cover the request's whole key.
        self._closed: dict[TreeNode, set[_Entry]] = {}
        # Ascending, so the LPM order is this reversed: the requests admitted next (longest match,
        # oldest) sit at the end, where removing them moves nothing.
        self._keys: list[SortKey] = []
        self._reqs: list[Req] = []  # parallel to _keys
        self._uids = itertools.count()

    # ---- membership ------------------------------------------------------------------------------
    def bind(self, tree: PrefixTree) -> None:
        """Follow `tree` (re-anchoring everything already indexed)."""
        if self._tree is tree:
            return
        if self._tree is not None:
            self._tree.remove_listener(self)
        self._tree = tree
        tree.add_listener(self)
        self._reanchor_all()

    def add(self, req: Req) -> None:
        if self._tree is None:
            self.bind(PrefixTree())  # not bound to a scheduler: nothing is cached
        if req in self._entries:
            self.remove(req)
        # the same cap the scheduler matches with: the last token (and any token whose prompt
        # logprob is wanted) is always computed
        e = _Entry(req, tuple(req.fill_ids[: req.max_prefix_len()]), next(self._uids))
        self._entries[req] = e
        self._anchor_from_root(e)
        e.sort_key = self._sort_key(e)
        i = bisect_left(self._keys, e.sort_key)
        self._keys.insert(i, e.sort_key)
        self._reqs.insert(i, req)

    def remove(self, req: Req) -> bool:
        e = self._entries.pop(req, None)
        if e is None:
            return False
        self._unplace(e)
        i = bisect_left(self._keys, e.sort_key)
        del self._keys[i]
        del self._reqs[i]
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, req: Req) -> bool:
        return req in self._entries

    def matched_len(self, req: Req) -> int:
        return self._entries[req].matched

    def anchor(self, req: Req, tree: PrefixTree) -> tuple[TreeNode, int] | None:
        """Where `req`'s match ends in `tree` (node, tokens into its edge), if this index follows
        that tree and holds `req`: `PrefixTree.match_at` then spares re-matching it."""
        e = self._entries.get(req)
        if e is None or tree is not self._tree:
            return None
        assert e.node is not None
        return e.node, e.offset

    def ordered(self) -> list[Req]:
        """Longest match first, ties by arrival."""
        return self._reqs[::-1]

    def anchors(self) -> Iterator[tuple[TreeNode, list[tuple[int, Req]]]]:
        """Each node where some match ends, with (tokens matched inside its edge, request) pairs."""
        nodes = set(self._open) | set(self._closed)
        for node in nodes:
            out: list[tuple[int, Req]] = []
            for bucket in self._open.get(node, {}).values():
                out.extend((e.offset, e.req) for e in bucket)
            out.extend((e.offset, e.req) for e in self._closed.get(node, ()))
            yield node, out

    # ---- tree events (TreeListener) ---------------------------------------------------------------
    def on_split(self, upper: TreeNode, lower: TreeNode) -> None:
        at = len(upper.key)
        closed = self._closed.pop(lower, None)
        if closed:
            for e in closed:
                if e.offset <= at:
                    e.node = upper
                else:
                    e.offset -= at
                self._place(e)
        opened = self._open.get(lower)
        if opened:
            for bucket in opened.values():
                for e in bucket:
                    e.offset -= at

    def on_add_leaf(self, parent: TreeNode, leaf: TreeNode) -> None:
        opened = self._open.get(parent)
        if not opened:
            return
        bucket = opened.pop(leaf.key[0], None)
        if bucket is None:
            return
        if not opened:
            del self._open[parent]
        tree = self._tree
        assert tree is not None
        for e in bucket:
            # the match went exactly to `parent`, and the leaf starts with its next token
            old = e.sort_key
            e.node, e.offset, e.matched = tree.peek(e.key, parent, e.matched)
            self._place(e)
            self._resort(e, old)

    def on_evict(self, node: TreeNode, parent: TreeNode) -> None:
        moved: list[_Entry] = list(self._closed.pop(node, ()))
        opened = self._open.pop(node, None)
        if opened:
            for bucket in opened.values():
                moved.extend(bucket)
        for e in moved:
            old = e.sort_key
            e.matched -= e.offset
            e.node = parent
            e.offset = len(parent.key)
            self._place(e)
            self._resort(e, old)

    def on_reset(self) -> None:
        self._reanchor_all()

    # ---- internals -------------------------------------------------------------------------------
    @staticmethod
    def _sort_key(e: _Entry) -> SortKey:
        r = e.req
        return (e.matched, -r.arrival_time, -r.arrival_seq, -e.uid)

    def _resort(self, e: _Entry, old: SortKey) -> None:
        new = self._sort_key(e)
        if new == old:
            return
        i = bisect_left(self._keys, old)
        del self._keys[i]
        del self._reqs[i]
        e.sort_key = new
        j = bisect_left(self._keys, new)
        self._keys.insert(j, new)
        self._reqs.insert(j, e.req)

    def _reanchor_all(self) -> None:
        self._open.clear()
        self._closed.clear()
        for e in self._entries.values():
            self._anchor_from_root(e)
            e.sort_key = self._sort_key(e)
        entries = sorted(self._entries.values(), key=lambda e: e.sort_key)
        self._keys = [e.sort_key for e in entries]
        self._reqs = [e.req for e in entries]

    def _anchor_from_root(self, e: _Entry) -> None:
        assert self._tree is not None, "bind(tree) first"
        e.node, e.offset, e.matched = self._tree.peek(e.key)
        self._place(e)

    def _place(self, e: _Entry) -> None:
        node = e.node
        assert node is not None
        if e.matched < len(e.key) and e.offset == len(node.key):
            self._open.setdefault(node, {}).setdefault(e.key[e.matched], set()).add(e)
        else:
            self._closed.setdefault(node, set()).add(e)

    def _unplace(self, e: _Entry) -> None:
        node = e.node
        assert node is not None
        closed = self._closed.get(node)
        if closed is not None and e in closed:
            closed.discard(e)
            if not closed:
                del self._closed[node]
            return
        opened = self._open[node]
        tok = e.key[e.matched]
        bucket = opened[tok]
        bucket.discard(e)
        if not bucket:
            del opened[tok]
            if not opened:
                del self._open[node]

    def check(self) -> None:
        """Compare every indexed match with a fresh walk of the tree (tests)."""
        assert self._tree is not None
        for req, e in self._entries.items():
            fresh = self._tree.peek(e.key)
            assert fresh == (e.node, e.offset, e.matched), (
                f"{req.rid}: indexed match {e.matched} at {e.node!r}+{e.offset}, "
                f"the tree says {fresh[2]} at {fresh[0]!r}+{fresh[1]}"
            )
        assert self._keys == sorted(self._sort_key(e) for e in self._entries.values())
        assert [self._entries[r].sort_key for r in self._reqs] == self._keys

