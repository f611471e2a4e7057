"""radixfair.metrics.fairness against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixfair.metrics import (
    RequestRecord,
    ServiceEvent,
    as_plain,
    backlogged_per_window,
    backlogged_rates,
    busy_intervals,
    events_from_records,
    fairness_report,
    hit_rate,
    jain_index,
    latency_by_client,
    percentile,
    service_difference,
    service_per_window,
    service_windows,
    window_edges,
)


def rec(client: str, arrival: float, first: float | None, finish: float | None, prompt: int = 10,
        cached: int = 0, out: int = 1) -> RequestRecord:
    return RequestRecord(client, arrival, first, finish, prompt, cached, out)


# ---- Jain ----------------------------------------------------------------------------------------


def test_jain_hand_values() -> None:
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0]) == pytest.approx(0.5)
    assert jain_index([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    # (1 + 2 + 3)^2 / (3 * (1 + 4 + 9)) = 36 / 42
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(36 / 42)
    # the FCFS share of a client sending 4x: 8 clients, rates (4, 1 x 7) -> 121 / (8 * 23)
    assert jain_index([4.0] + [1.0] * 7) == pytest.approx(121 / 184)


def test_jain_edge_cases() -> None:
    assert math.isnan(jain_index([]))
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([7.0]) == 1.0


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=30))
def test_jain_bounds_and_scale_invariance(xs: list[float]) -> None:
    j = jain_index(xs)
    assert 1 / len(xs) - 1e-9 <= j <= 1 + 1e-9
    if sum(xs) > 0:
        assert jain_index([3 * x for x in xs]) == pytest.approx(j)


# ---- windows and service -------------------------------------------------------------------------


def test_window_edges() -> None:
    np.testing.assert_allclose(window_edges(0, 10, 5), [0, 5, 10])
    # a partial last window instead of dropping the tail
    np.testing.assert_allclose(window_edges(0, 10, 4), [0, 4, 8, 10])
    np.testing.assert_allclose(window_edges(2, 3, 0.5), [2, 2.5, 3])
    with pytest.raises(ValueError):
        window_edges(0, 10, 0)
    with pytest.raises(ValueError):
        window_edges(5, 5, 1)


def test_service_per_window_bins_half_open() -> None:
    edges = window_edges(0, 10, 5)
    events = [
        ServiceEvent(0.0, "a", 1), ServiceEvent(4.99, "a", 2), ServiceEvent(5.0, "a", 4),  # 5.0 -> 2nd
        ServiceEvent(9.0, "b", 8), ServiceEvent(10.0, "b", 100),  # t1 is outside
        ServiceEvent(-1.0, "a", 100), ServiceEvent(1.0, "zz", 100),  # before t0; unknown client
    ]
    np.testing.assert_allclose(service_per_window(events, ["a", "b"], edges), [[3, 0], [4, 8]])


def test_events_from_records_charge_and_spacing() -> None:
    r = rec("a", 0.0, 1.0, 3.0, prompt=100, cached=60, out=5)
    ev = events_from_records([r], w_in=1, w_out=2)
    # prefill: 40 uncached input + the first output token; then 4 tokens 0.5 s apart up to the finish
    assert ev[0] == ServiceEvent(1.0, "a", 40 + 2)
    assert [e.time for e in ev[1:]] == pytest.approx([1.5, 2.0, 2.5, 3.0])
    assert sum(e.amount for e in ev) == r.charged(1, 2) == 40 + 10
    # not admitted: nothing charged; unfinished: tokens spread up to `end`, or lumped without one
    assert events_from_records([rec("a", 0, None, None, out=0)]) == []
    u = rec("a", 0.0, 1.0, None, prompt=10, cached=0, out=3)
    assert [e.time for e in events_from_records([u], end=2.0)] == pytest.approx([1.0, 1.5, 2.0])
    assert [e.amount for e in events_from_records([u])] == [10 + 2, 4]


# ---- backlog -------------------------------------------------------------------------------------


def test_busy_intervals_merge_overlapping_and_touching() -> None:
    records = [rec("a", 0, 1, 2), rec("a", 1.5, 3, 4), rec("a", 4, 5, 6), rec("a", 7, 8, 9), rec("b", 1, None, None)]
    busy = busy_intervals(records, end=10)
    assert busy["a"] == [(0, 6), (7, 9)]
    assert busy["b"] == [(1, 10)]  # unfinished: present up to the end


def test_backlog_detection_per_window() -> None:
    # windows [0,2) [2,4) [4,6) [6,8)
    edges = window_edges(0, 8, 2)
    records = [
        rec("a", 0, 0.5, 5),  # a busy [0, 5): backlogged in the first two windows only
        rec("b", 1, 2, 3), rec("b", 3, 4, 8),  # b busy [1, 8): not the first window (arrived at 1)
        rec("c", 0, None, None),  # c waits forever: backlogged everywhere
        rec("d", 2.5, 3, 3.5),  # d never covers a whole window
    ]
    got = backlogged_per_window(records, ["a", "b", "c", "d", "e"], edges)
    np.testing.assert_array_equal(
        got,
        [
            [True, False, True, False, False],
            [True, True, True, False, False],
            [False, True, True, False, False],
            [False, True, True, False, False],
        ],
    )


def test_service_difference_only_among_backlogged() -> None:
    records = [rec("a", 0, None, None), rec("b", 0, None, None), rec("c", 0, 1, 2.5)]
    events = [
        ServiceEvent(1, "a", 10), ServiceEvent(1, "b", 4), ServiceEvent(1, "c", 100),  # c: [0,2) only
        ServiceEvent(3, "a", 5), ServiceEvent(3, "b", 6),
    ]
    sw = service_windows(records, events, 0, 4, 2, clients=["a", "b", "c"])
    np.testing.assert_array_equal(sw.backlogged[:, 2], [True, False])
    diff = service_difference(sw)
    # window 0 among a, b, c: 100 - 4; window 1 among a, b: 6 - 5
    np.testing.assert_allclose(diff.per_window, [96, 1])
    assert diff.max == 96
    assert diff.mean == pytest.approx(48.5)


def test_service_difference_without_pairs_is_nan() -> None:
    sw = service_windows([rec("a", 0, None, None)], [ServiceEvent(1, "a", 1)], 0, 2, 1)
    d = service_difference(sw)
    assert math.isnan(d.max) and math.isnan(d.mean)


def test_backlogged_rates_and_floor() -> None:
    records = [rec("a", 0, None, None), rec("b", 0, 1, 3.5), rec("c", 3, None, None)]
    events = [ServiceEvent(0.5, "a", 4), ServiceEvent(2.5, "a", 8), ServiceEvent(0.5, "b", 2),
              ServiceEvent(3.5, "b", 50), ServiceEvent(3.5, "c", 1)]
    sw = service_windows(records, events, 0, 4, 1, clients=["a", "b", "c"])
    rates = backlogged_rates(sw, min_fraction=0.5)
    # a: backlogged in all 4 windows, 12 tokens / 4 s; b: windows 0-2, 2 tokens / 3 s (the 50 came
    # after it stopped being backlogged); c: backlogged in 1 of 4 windows, under the floor -> left out
    assert rates == pytest.approx({"a": 3.0, "b": 2 / 3})
    assert backlogged_rates(sw, min_fraction=0.9) == pytest.approx({"a": 3.0})


# ---- latency and hit rate ------------------------------------------------------------------------


def test_percentiles_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_latency_by_client_uses_finished_requests() -> None:
    records = [
        rec("a", 0, 1, 2), rec("a", 1, 2, 5), rec("a", 2, 3, 4), rec("a", 0, 3, None),  # last: unfinished
        rec("b", 0, None, None),
    ]
    lat = latency_by_client(records, ["a", "b", "c"])
    a = lat["a"]
    assert a.n == 3
    # e2e = [2, 4, 2] -> p50 2, p99 2 + 0.98 * (4 - 2); ttft = [1, 1, 1]
    assert a.e2e_p50 == pytest.approx(2.0)
    assert a.e2e_p99 == pytest.approx(3.96)
    assert a.ttft_p50 == a.ttft_p99 == pytest.approx(1.0)
    assert lat["b"].n == 0 and math.isnan(lat["b"].e2e_p99)
    assert lat["c"].n == 0
    plain = as_plain(lat)
    assert plain["b"]["e2e_p99"] is None
    json.dumps(plain)  # JSON-ready


def test_hit_rate_over_admitted_requests() -> None:
    records = [rec("a", 0, 1, 2, prompt=100, cached=75), rec("b", 0, 1, None, prompt=100, cached=25),
               rec("c", 0, None, None, prompt=1000, cached=0)]  # never admitted: cached count unknown
    assert hit_rate(records) == pytest.approx(0.5)
    assert hit_rate([]) == 0.0


# ---- the whole report ----------------------------------------------------------------------------


def test_fairness_report_two_backlogged_clients() -> None:
    # a and b wait the whole 10 s; a receives 2x b's service; c comes and goes within one window
    records = [rec("a", 0, None, None), rec("b", 0, None, None), rec("c", 1, 2, 3, prompt=10, out=1)]
    events = [ServiceEvent(t + 0.5, "a", 20) for t in range(10)] + [ServiceEvent(t + 0.5, "b", 10) for t in range(10)]
    rep = fairness_report(records, events, t0=0, t1=10, window=5)
    assert rep.windows.clients == ("a", "b", "c")
    assert rep.total_service == {"a": 200, "b": 100, "c": 0}
    assert rep.backlogged_rates == pytest.approx({"a": 20, "b": 10})
    assert rep.jain == pytest.approx(900 / (2 * 500))
    assert rep.service_difference.max == pytest.approx(50)
    assert rep.latency["c"].e2e_p50 == pytest.approx(2)
    assert rep.overall_latency.n == 1


def test_fairness_report_rebuilds_events_from_records() -> None:
    records = [rec("a", 0, 1, 3, prompt=10, cached=4, out=3), rec("b", 0, 1, 3, prompt=10, cached=4, out=3)]
    rep = fairness_report(records, t0=0, t1=4, window=1, w_in=1, w_out=2)
    assert rep.total_service == {"a": 12, "b": 12}
    assert rep.hit_rate == pytest.approx(0.4)
    assert rep.jain == pytest.approx(1.0)
