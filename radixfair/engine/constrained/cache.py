"""Compiled grammars, least recently used out, keyed by (kind, text): a repeated schema compiles once.
Compilation runs in worker threads so that a caller waits at most the time bound for it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from radixfair.engine.constrained.base import Grammar, GrammarError, GrammarSpec

COMPILE_WORKERS = 4


class GrammarCache:
    def __init__(self, compile_fn: Callable[[GrammarSpec], Grammar], capacity: int, timeout_s: float) -> None:
        self._compile_fn = compile_fn
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        # futures, so that requests with the same grammar arriving together wait for one compilation
        self._entries: OrderedDict[GrammarSpec, Future[Grammar]] = OrderedDict()
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="radixfair-grammar")
        self.hits = 0
        self.misses = 0

    def _compile(self, spec: GrammarSpec) -> Grammar:
        try:
            return self._compile_fn(spec)
        except GrammarError:
            raise
        except Exception as e:  # a library's own exception for input it cannot take: the caller's input
            raise GrammarError(f"{spec.kind}: {e}") from e

    def get(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar; GrammarError if it does not compile, or not within the time bound (a
        compilation still running is kept: the next request with this grammar may find it done).
        A grammar that failed stays cached as failed: the same input fails the same way."""
        with self._lock:
            fut = self._entries.get(spec)
            if fut is not None:
                self._entries.move_to_end(spec)
                self.hits += 1
            else:
                self.misses += 1
                fut = self._entries[spec] = self._pool.submit(self._compile, spec)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(f"{spec.kind}: compiling it took longer than {self.timeout_s:g} s "
                               f"(--grammar-compile-timeout)") from None

    def __len__(self) -> int:
        return len(self._entries)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
