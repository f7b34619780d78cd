"""Evaluation loss: one function for training's evaluations and `strop eval`.

The loss of every trained token of the eval split, summed and divided once by their count
(token-weighted, not a mean of batch means), dropout off, summed over ranks when several
processes each score their share.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from strop.train import distributed
from strop.train.distributed import SINGLE, World

# The "epoch" of evaluation batches' random choices (a masked LM masks at random): the same
# masks in training's evaluations and in `strop eval`.
EVAL_STREAM = 1_000_000


def evaluation_loss(model: nn.Module, loss_model: Any,
                    batches: Iterable[dict[str, torch.Tensor]],
                    autocast: contextlib.AbstractContextManager | None = None,
                    world: World = SINGLE,
                    forward: Callable[[dict[str, torch.Tensor]], tuple[dict, dict]] | None = None,
                    ) -> dict[str, float]:
    """eval_loss over `batches`: each unit of the loss (trained tokens; pairs) summed over the
    split and divided once by its count; eval_ppl and eval_tokens for a token loss, the eval_
    metrics of a preference loss. `forward(batch)` (default: loss_model.parts, or the wrapped
    module training steps through) gives a batch's sums. `model` is put in eval mode and back."""
    forward = forward or loss_model.parts
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    counts: dict[str, float] = {}
    metrics: dict[str, list[float]] = {}
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            for batch in batches:
                for unit, n in loss_model.counts(batch).items():
                    counts[unit] = counts.get(unit, 0) + n
                sums, batch_metrics = forward(batch)
                for unit, value in sums.items():
                    totals[unit] = totals.get(unit, 0.0) + float(value.detach())
                for name, (value, count) in batch_metrics.items():
                    kept = metrics.setdefault(name, [0.0, 0.0])
                    kept[0] += float(value)
                    kept[1] += float(count)
    finally:
        model.train(was_training)
    units, names = sorted(counts), sorted(metrics)
    summed = distributed.all_sum(world, *(totals.get(u, 0.0) for u in units),
                                 *(counts[u] for u in units),
                                 *(x for n in names for x in metrics[n]))
    k = len(units)
    total, count = dict(zip(units, summed[:k], strict=True)), dict(zip(units, summed[k:2 * k],
                                                                        strict=True))
    loss = sum(total[u] / max(count[u], 1) for u in units)
    if units == ["tokens"]:
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                "eval_tokens": int(count["tokens"])}
    rest = summed[2 * k:]
    out = {"eval_loss": loss, **{f"eval_{u}": int(count[u]) for u in units}}
    for j, name in enumerate(names):
        value, n = rest[2 * j], rest[2 * j + 1]
        if n:
            out[f"eval_{name}"] = value / n
    return out
