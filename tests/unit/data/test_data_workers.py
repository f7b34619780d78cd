"""ordered_map: results in order from forked workers, errors surface, and few items in flight."""

from __future__ import annotations

import os

import pytest

from strop.data.workers import can_fork, ordered_map


def _pid_and_square(x):
    return os.getpid(), x * x


def test_results_come_back_in_order_from_other_processes():
    out = list(ordered_map(_pid_and_square, range(50), workers=2))
    assert [v for _, v in out] == [x * x for x in range(50)]
    if can_fork():
        assert os.getpid() not in {pid for pid, _ in out}


def test_one_worker_runs_here():
    assert {pid for pid, _ in ordered_map(_pid_and_square, range(5), workers=1)} == {os.getpid()}


def test_a_closure_over_local_state_works():  # the workers inherit it through fork
    offset = 7
    assert list(ordered_map(lambda x: x + offset, range(5), workers=2)) == [7, 8, 9, 10, 11]


def test_an_error_in_a_worker_reaches_the_caller():
    def boom(x):
        if x == 3:
            raise ValueError("row 3 is bad")
        return x

    with pytest.raises(ValueError, match="row 3 is bad"):
        list(ordered_map(boom, range(10), workers=2))


def test_items_are_read_as_results_are_taken_not_all_at_once():
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    results = ordered_map(lambda x: x, items(), workers=2)
    assert next(results) == 0
    assert len(read) <= 2 * 2 + 2
    assert list(results) == list(range(1, 100))
