"""Learning-rate schedules: a multiplier of the peak learning rate for each optimizer step.

One function per schedule, all with linear warmup from 0 (one_cycle warms from
lr / lr_div_factor, as torch's OneCycleLR does). The loop wraps `lr_multiplier` in a LambdaLR,
whose state (the step) is what a checkpoint saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    name: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a share of the peak
    div_factor: float = 25.0  # one_cycle: starting lr = peak / div_factor

    def __call__(self, step: int) -> float:
        return lr_multiplier(self, step)


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    if warmup_ratio:
        return math.ceil(total_steps * warmup_ratio)
    return 0


def lr_multiplier(s: Schedule, step: int) -> float:
    """Multiplier for the update made at optimizer step `step` (0-based)."""
    total = max(s.total_steps, 1)
    if s.name == "one_cycle":
        return _one_cycle(s, step, total)
    if s.name == "constant":
        return 1.0
    if step < s.warmup_steps:
        return (step + 1) / (s.warmup_steps + 1)
    if s.name == "constant_with_warmup":
        return 1.0
    decay_steps = max(total - s.warmup_steps, 1)
    progress = min((step - s.warmup_steps) / decay_steps, 1.0)
    if s.name == "linear":
        return 1.0 - progress
    if s.name == "cosine":
        return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {s.name!r}")


def _one_cycle(s: Schedule, step: int, total: int) -> float:
    # Cosine up from peak/div to peak over the warmup (30% of the run by default), then cosine
    # down to peak/(div * 1e4), as torch.optim.lr_scheduler.OneCycleLR does.
    start, end = 1.0 / s.div_factor, 1.0 / (s.div_factor * 1e4)
    up = s.warmup_steps or max(int(0.3 * total), 1)
    if step < up:
        return _cos_between(start, 1.0, step / up)
    return _cos_between(1.0, end, min((step - up) / max(total - up, 1), 1.0))


def _cos_between(a: float, b: float, progress: float) -> float:
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * progress))
