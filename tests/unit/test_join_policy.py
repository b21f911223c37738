"""The join policy alone: when waiting requests join the running batch (no MLX, no threads)."""

from __future__ import annotations

import pytest

from appliance.engine.join import ARRIVING_WAIT_S, IDLE_S, POLL_S, RETURN_S, SETTLE_S, JoinPolicy

EPS = 1e-9


def policy(window: float = 0.02, prefill: int = 8, completion: int = 32) -> JoinPolicy:
    return JoinPolicy(window, prefill, completion)


def test_a_lone_arrival_on_an_idle_engine_settles_then_joins() -> None:
    p = policy()
    assert not p.ready(10.0, 0, [10.0], lambda: 0)  # settling: another may be right behind
    assert p.timeout(10.0, 0, [10.0]) == pytest.approx(SETTLE_S)
    assert p.ready(10.0 + SETTLE_S + EPS, 0, [10.0], lambda: 0)


def test_waits_while_the_front_holds_more_requests_up_to_the_arriving_wait() -> None:
    p = policy()
    assert not p.ready(10.05, 1, [10.0], lambda: 3)
    assert p.timeout(10.05, 0, [10.0]) == POLL_S  # polls while requests are on their way
    assert p.ready(10.0 + ARRIVING_WAIT_S + EPS, 1, [10.0], lambda: 3)


def test_waits_for_as_many_as_just_ended_within_the_window() -> None:
    p = policy()
    p.ended_at(9.99)
    p.ended_at(9.99)
    assert not p.ready(10.0, 1, [10.0], lambda: 0)  # two ended, one came back so far
    assert p.ready(10.0, 1, [10.0, 10.0], lambda: 0)
    p.joined(2)
    assert not p.ended


def test_the_window_bounds_the_wait_for_returning_clients() -> None:
    p = policy(window=0.02)
    p.ended_at(9.99)
    p.ended_at(9.99)
    assert not p.ready(10.01, 1, [10.0], lambda: 0)
    assert p.ready(10.02 + EPS, 1, [10.0], lambda: 0)


def test_ends_older_than_the_return_time_stop_holding_anyone() -> None:
    p = policy()
    p.ended_at(0.0)
    p.ended_at(0.0)
    assert p.ready(RETURN_S + 1.0, 1, [RETURN_S + 1.0], lambda: 0)
    assert not p.ended


def test_a_full_prefill_batch_and_a_zero_window_join_at_once() -> None:
    assert policy(prefill=2).ready(10.0, 1, [10.0, 10.0], lambda: 5)
    assert policy(window=0.0).ready(10.0, 0, [10.0], lambda: 5)


def test_no_blocking_while_rows_run_and_idle_polling_otherwise() -> None:
    p = policy()
    assert p.timeout(10.0, 3, []) is None
    assert p.timeout(10.0, 0, []) == IDLE_S
    p.ended_at(9.0)
    p.idle()
    assert not p.ended


def test_a_full_batch_does_not_wait_for_arrivals() -> None:
    calls: list[int] = []

    def arriving() -> int:
        calls.append(1)
        return 10

    p = policy(completion=2)
    assert p.ready(10.0 + SETTLE_S + EPS, 1, [10.0], arriving)
    assert not calls  # the front is not asked when no more would fit
