"""LR schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from strop.train.schedule import Schedule, lr_multiplier, warmup_steps_for


def curve(name, total=10, warmup=0, **kw):
    s = Schedule(name, total, warmup, **kw)
    return [lr_multiplier(s, i) for i in range(total)]


def test_constant():
    assert curve("constant") == [1.0] * 10


def test_warmup_is_linear_and_never_zero():
    got = curve("constant_with_warmup", warmup=3)
    assert got[:4] == [0.25, 0.5, 0.75, 1.0] and got[-1] == 1.0


def test_linear_decays_to_zero_at_the_end():
    got = curve("linear", total=6, warmup=2)
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])


def test_cosine_with_min_ratio():
    got = curve("cosine", total=5, min_lr_ratio=0.1)
    want = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    assert got == pytest.approx(want)
    assert min(curve("cosine", total=100, min_lr_ratio=0.2)) > 0.2


def test_one_cycle_rises_then_falls():
    got = curve("one_cycle", total=100, div_factor=25.0)
    peak = max(got)
    assert got[0] == pytest.approx(1 / 25) and peak == pytest.approx(1.0, abs=1e-3)
    assert got.index(peak) == pytest.approx(30, abs=1) and got[-1] < 1e-3


def test_warmup_steps_from_ratio_or_steps():
    assert warmup_steps_for(100, None, 0.05) == 5
    assert warmup_steps_for(100, 7, None) == 7
    assert warmup_steps_for(5, 10, None) == 5
    assert warmup_steps_for(100, None, None) == 0
