"""Refilling the spare pool (edge.refill, edge.routing.spares.running_low): one reload when the free
spares fall to a quarter of the pool, once Consul has been quiet, at most MAX_WAIT late; never
again for a table a refill already failed on."""

import pytest

from edge.refill import Refill
from edge.routing.model import Instance
from edge.routing.spares import SparePool, assign, low_water, running_low
from edge.routing.table import build_table


def table_with(taken: int, pool: SparePool):
    """A table whose first `taken` routes occupy spares 1..taken."""
    base = build_table({})
    services = {f"s{i}": (Instance(f"s{i}", "n", f"s{i}-1", "10.0.0.1", 9000 + i, 80, True),) for i in range(taken)}
    return assign(base, build_table(services), pool)


@pytest.mark.parametrize("size, mark", [(1, 1), (3, 1), (4, 1), (8, 2), (32, 8), (100, 25)])
def test_the_low_water_mark_is_a_quarter_of_the_pool_and_at_least_one(size, mark):
    assert low_water(SparePool(size)) == mark


@pytest.mark.parametrize("size, taken, reason", [
    (0, 0, None),
    (32, 0, None),
    (32, 23, None),                                              # 9 free: above the mark
    (32, 24, "spare backends running low: 8 of 32 free"),
    (32, 31, "spare backends running low: 1 of 32 free"),
    (32, 32, "spare backends exhausted: 0 of 32 free"),
    (4, 2, None),
    (4, 3, "spare backends running low: 1 of 4 free"),
])
def test_running_low(size, taken, reason):
    pool = SparePool(size)
    table = table_with(taken, pool)
    assert sum(1 for r in table.routes if r.spare) == min(taken, size)
    assert running_low(pool, table) == reason


def test_no_table_yet_is_not_low():
    assert running_low(SparePool(4), None) is None


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_refill_waits_for_quiet_inputs_then_is_due_once_per_table():
    pool, clock = SparePool(4), Clock()
    refill = Refill(pool, quiet=2.0, max_wait=30.0, clock=clock)
    low = table_with(3, pool)
    assert refill.due(table_with(2, pool), last_input=clock.now) is None      # not low
    assert refill.due(low, last_input=clock.now) is None                      # low, a burst still arriving
    clock.now += 1.9
    assert refill.due(low, last_input=100.0) is None
    clock.now += 0.2
    assert refill.due(low, last_input=100.0) == "spare backends running low: 1 of 4 free"
    clock.now += 10
    assert refill.due(low, last_input=100.0) is None          # that reload failed: not again for this table
    again = table_with(4, pool)
    assert refill.due(again, last_input=100.0) == "spare backends exhausted: 0 of 4 free"


def test_inputs_that_never_settle_wait_at_most_max_wait():
    pool, clock = SparePool(4), Clock()
    refill = Refill(pool, quiet=2.0, max_wait=30.0, clock=clock)
    low = table_with(3, pool)
    for _ in range(29):
        assert refill.due(low, last_input=clock.now) is None
        clock.now += 1.0
    clock.now += 1.0
    assert refill.due(low, last_input=clock.now) == "spare backends running low: 1 of 4 free"


def test_a_refilled_pool_starts_over():
    pool, clock = SparePool(4), Clock()
    refill = Refill(pool, quiet=2.0, max_wait=30.0, clock=clock)
    refill.due(table_with(3, pool), last_input=clock.now)
    clock.now += 100
    assert refill.due(table_with(0, pool), last_input=clock.now) is None     # the reload freed them all
    low = table_with(3, pool)
    assert refill.due(low, last_input=clock.now) is None                    # low again: the wait starts over
