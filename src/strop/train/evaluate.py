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


def evaluation_loss(model: nn.Module, forward: Callable[[dict[str, torch.Tensor]], tuple[Any, int]],
                    batches: Iterable[dict[str, torch.Tensor]],
                    autocast: contextlib.AbstractContextManager | None = None,
                    world: World = SINGLE) -> dict[str, float]:
    """eval_loss, eval_ppl and eval_tokens over `batches`; `forward(batch)` gives a batch's
    summed loss and trained-token count. `model` is put in eval mode and back."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            for batch in batches:
                loss_sum, n = forward(batch)
                total += float(loss_sum.detach())
                count += n
    finally:
        model.train(was_training)
    total, count = distributed.all_sum(world, total, count)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}
