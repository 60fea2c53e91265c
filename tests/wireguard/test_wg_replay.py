"""The replay window against a model: a set of seen counters and the highest one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtun.wireguard.replay import WINDOW_SIZE, ReplayWindow

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace

LIMIT = 2**64 - 2**13 - 1


class Model:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.last = 0

    def accept(self, counter: int, limit: int) -> bool:
        if counter >= limit or counter in self.seen:
            return False
        if counter <= self.last and self.last - counter > WINDOW_SIZE:
            return False
        self.seen.add(counter)
        self.last = max(self.last, counter)
        return True

    def check(self, counter: int, limit: int) -> bool:
        if counter >= limit or counter in self.seen:
            return False
        return counter > self.last or self.last - counter <= WINDOW_SIZE


# counters clustered around a moving point, with jumps past the window and back
_steps = st.lists(st.one_of(st.integers(-WINDOW_SIZE - 70, 200),
                            st.integers(-WINDOW_SIZE - 70, -WINDOW_SIZE + 70),
                            st.integers(WINDOW_SIZE - 70, 3 * WINDOW_SIZE)), max_size=300)


@given(_steps)
def test_window_matches_the_model(steps: list[int]) -> None:
    window, model = ReplayWindow(), Model()
    base = 0
    for step in steps:
        counter = max(0, base + step)
        base = max(base, counter)
        expected = model.accept(counter, LIMIT)
        assert window.check(counter, LIMIT) == expected
        assert window.accept(counter, LIMIT) == expected, (counter, window.last)


def test_edges() -> None:
    w = ReplayWindow()
    assert w.accept(0, LIMIT) and not w.accept(0, LIMIT)
    assert w.accept(WINDOW_SIZE + 100, LIMIT)
    assert not w.accept(99, LIMIT)               # one past the window's tail
    assert w.accept(100, LIMIT)                  # exactly WINDOW_SIZE behind: still inside
    assert not w.accept(100, LIMIT)
    assert not w.check(LIMIT, LIMIT) and not w.accept(LIMIT, LIMIT)
    w.accept(10**6, LIMIT)                       # a jump clears the whole ring
    assert w.accept(10**6 - 1, LIMIT) and w.accept(10**6 - WINDOW_SIZE, LIMIT)


def test_check_does_not_mark() -> None:
    w = ReplayWindow()
    assert w.check(5, LIMIT) and w.check(5, LIMIT)
    assert w.last == 0 and w.accept(5, LIMIT) and not w.check(5, LIMIT)


_runs = st.lists(st.tuples(st.integers(-WINDOW_SIZE - 70, 3 * WINDOW_SIZE),
                           st.integers(0, 3 * WINDOW_SIZE), st.booleans()), max_size=60)


@given(_runs)
def test_a_run_is_taken_as_its_counters_one_by_one(runs: list[tuple[int, int, bool]]) -> None:
    """accept_run(first, count) leaves the window as `count` accepts would (runs longer than
    the ring and jumps included), and refuses, changing nothing, a run that is not all new."""
    window, model = ReplayWindow(), Model()
    base = 0
    for step, count, single in runs:
        first = max(0, base + step)
        if single:
            assert window.accept(first, LIMIT) == model.accept(first, LIMIT)
        else:
            fresh = count > 0 and first > model.last
            before = (window.last, list(window._ring))
            assert window.accept_run(first, count, LIMIT) == fresh
            if fresh:
                assert all(model.accept(c, LIMIT) for c in range(first, first + count))
            else:
                assert (window.last, window._ring) == before
        base = max(base, model.last)
        for probe in range(max(0, model.last - WINDOW_SIZE - 3), model.last + 3, 7):
            assert window.check(probe, LIMIT) == model.check(probe, LIMIT), probe


def test_a_run_past_the_limit_is_refused() -> None:
    w = ReplayWindow()
    assert not w.accept_run(LIMIT - 2, 3, LIMIT) and w.last == 0
    assert w.accept_run(LIMIT - 3, 3, LIMIT) and not w.accept(LIMIT - 1, LIMIT)
