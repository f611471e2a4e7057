"""Counters of what a program costs an API: calls, tokens, and what API speculative execution saved.

A state counts its own calls; each count also goes to its backend's counters, so a backend's totals
cover every program that ran on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class UsageCounts:
    """A snapshot of `ApiUsage`."""

    calls: int = 0  # requests that generated text (gen, select)
    input_tokens: int = 0  # prompt tokens those requests sent, as the server counted them
    output_tokens: int = 0
    spec_calls: int = 0  # calls that speculated past their own gen's stop
    spec_hits: int = 0  # gens answered from speculated text, without a call
    spec_misses: int = 0  # speculations dropped because the program's text or settings went another way
    input_tokens_saved: int = 0  # prompt tokens the hits would have sent (estimated from the speculation)

    @property
    def calls_saved(self) -> int:
        return self.spec_hits


class ApiUsage:
    """Thread-safe counters; `add` also adds to `parent` (a backend's totals)."""

    def __init__(self, parent: ApiUsage | None = None) -> None:
        self.parent = parent
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(UsageCounts)), 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += int(value)
        if self.parent is not None:
            self.parent.add(**counts)

    def snapshot(self) -> UsageCounts:
        with self._lock:
            return UsageCounts(**self._counts)

    def reset(self) -> None:
        with self._lock:
            for name in self._counts:
                self._counts[name] = 0
