"""The replay window against a model: a set of seen counters and the highest one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqtun.wireguard.replay import WINDOW_SIZE, ReplayWindow

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
