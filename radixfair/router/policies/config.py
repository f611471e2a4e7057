"""The routing policies' settings, declared once each.

A policy's config is a frozen dataclass assembled from the groups below, so that a setting shared by
two policies (the balance thresholds of `cache_aware` and `d2lpm`, say) is one field with one
default and one help text, and a command line built from several configs (`config_flags`) gets one
flag for it. Names follow sgl-router's where the concept is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.metrics.service import W_IN, W_OUT


@dataclass(frozen=True)
class RouterConfig:
    """Base of every policy config: runs each group's `_check_*` method on construction."""

    def __post_init__(self) -> None:
        for name in sorted(dir(self)):
            if name.startswith("_check_"):
                getattr(self, name)()


def check_positive(owner: object, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(owner, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")


@dataclass(frozen=True)
class LoadBalance(RouterConfig):
    """sgl-router's test for load imbalance, counted in requests in flight per worker."""

    balance_abs_threshold: int = flag(64, "load is imbalanced when the busiest worker has more than this many "
                                          "requests in flight above the least busy one ...")
    balance_rel_threshold: float = flag(1.5, "... and more than this many times as many")

    def _check_balance(self) -> None:
        check_positive(self, "balance_abs_threshold", allow_zero=True)
        check_positive(self, "balance_rel_threshold")

    def imbalanced(self, high: int, low: int) -> bool:
        return high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold


@dataclass(frozen=True)
class CacheMatch(RouterConfig):
    cache_threshold: float = flag(0.3, "a worker's cached prefix is worth following when it covers more than this "
                                       "fraction of the prompt")

    def _check_cache_match(self) -> None:
        if not (isinstance(self.cache_threshold, (int, float)) and 0 <= self.cache_threshold <= 1):
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold!r}")


# sgl-router's default is 2**26 *characters* of text per worker; this index holds token ids as
# Python ints (about 36 bytes each), so the bound is in tokens and 16x smaller: 2**22 tokens (some
# 150 MB per worker at worst) is still several times what one large GPU keeps in its KV cache.
DEFAULT_MAX_TREE_SIZE = 1 << 22


@dataclass(frozen=True)
class PrefixIndexLimits(RouterConfig):
    """How the router's view of each worker's cache forgets (`worker_index.WorkerPrefixIndex`)."""

    eviction_interval_secs: float = flag(120.0, "every this many seconds, trim each worker's prefix index to "
                                                "--max-tree-size by evicting least-recently-used prefixes; "
                                                "0 trims on every dispatch")
    max_tree_size: int = flag(DEFAULT_MAX_TREE_SIZE, "tokens the router's prefix index keeps per worker")

    def _check_index(self) -> None:
        check_positive(self, "eviction_interval_secs", allow_zero=True)
        check_positive(self, "max_tree_size")


@dataclass(frozen=True)
class ServiceCosts(RouterConfig):
    """What a request costs a client, in the tokens the workers' fair policies charge."""

    w_in: float = flag(W_IN, "cost of a prompt token the worker has to compute (global_vtc: of any prompt token)")
    w_out: float = flag(W_OUT, "cost of an output token")

    def _check_costs(self) -> None:
        check_positive(self, "w_in", "w_out", allow_zero=True)
        if self.w_in == 0 and self.w_out == 0:
            raise ValueError("w_in and w_out are both 0: no request would cost anything")


DEFAULT_MAX_CLIENTS = 100_000


@dataclass(frozen=True)
class ClientLimit(RouterConfig):
    max_clients: int = flag(DEFAULT_MAX_CLIENTS, "clients whose fairness state the router keeps; idle clients "
                                                 "that owe nothing are forgotten, and a new client past the "
                                                 "limit is refused (ClientLimitError)")

    def _check_clients(self) -> None:
        check_positive(self, "max_clients")
