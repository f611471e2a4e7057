"""Test helpers shared by several test modules."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from radixfair.cache.allocator import SlotAllocator, SlotArray
from radixfair.sched.request import Req
from radixfair.sched.scheduler import SchedulerConfig, fit_max_new_tokens


class TrackingAllocator(SlotAllocator):
    """Knows exactly which slots are handed out, so double frees and leaks fail loudly."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.outstanding: set[int] = set()
        self.free_log: list[int] = []

    def alloc(self, n: int) -> SlotArray | None:
        out = super().alloc(n)
        if out is not None:
            for s in out.tolist():
                assert s not in self.outstanding, f"slot {s} handed out twice"
                self.outstanding.add(s)
        return out

    def free(self, slots: SlotArray) -> None:
        for s in np.asarray(slots).tolist():
            assert s in self.outstanding, f"slot {s} freed but not handed out"
            self.outstanding.remove(s)
            self.free_log.append(s)
        super().free(slots)


def bounded(fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
    """Run `fn` in a helper thread; fail (not hang) if it does not return within `timeout` seconds."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def fit(req: Req, config: SchedulerConfig) -> None:
    """What the engine does before it queues a request: refuse what can never be served (ValueError)
    and clip max_new_tokens to the context."""
    sp = req.sampling_params
    fitted = fit_max_new_tokens(len(req.origin_input_ids), sp.max_new_tokens, config)
    if fitted != sp.max_new_tokens:
        req.sampling_params = sp.replace(max_new_tokens=fitted, min_new_tokens=min(sp.min_new_tokens, fitted))
