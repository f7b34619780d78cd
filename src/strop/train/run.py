"""A run as setup builds it (strop.train.loop), and what is read off it: this rank's
micro-batches of a step, the summary written at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from strop.config.schema import StropConfig
from strop.data.batches import batch_generator
from strop.precision import Precision
from strop.recipe.decide import Decisions
from strop.train import checkpoint as ckpt
from strop.train import distributed
from strop.train.distributed import SINGLE, World
from strop.train.forward import LossModel
from strop.train.log import peak_memory_bytes


@dataclass
class Run:
    """Everything setup builds; the loop only reads it (and updates `state`)."""

    cfg: StropConfig
    config_text: str  # the resolved config, saved beside every checkpoint
    out: Path
    decisions: Decisions  # precision, attention, lean activations (strop.recipe.decide)
    tokenizer: Any
    loss_model: LossModel
    data: Any  # strop.data.PreparedData
    train_plan: Any  # strop.data.batches.BatchPlan
    eval_plan: Any | None
    collate: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    total_steps: int
    eval_every: int | None
    save_every: int | None
    log_every: int
    flops_per_token: float
    peak_flops: float | None
    state: ckpt.TrainerState
    resumed_from: Path | None
    trainable_params: int
    total_params: int
    world: World = SINGLE
    # What forward and backward run through: the loss as a module, inside DDP or FSDP2 when
    # several processes train (strop.train.distributed).
    step_module: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        return self.loss_model.model

    @property
    def precision(self) -> Precision:
        return self.decisions.precision

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation at this rate; None where the device's peak is unknown."""
        if not self.peak_flops:
            return None
        return self.flops_per_token * tokens_per_s / self.peak_flops


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def my_batches(run: Run, rows: Any, window: list[tuple[int, Any]],
               stream: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This rank's share of `window` ((index, row indices) micro-batches) as device batches,
    and their tokens (padding excluded). A short share is padded (distributed.share) with a
    pass whose labels are all -100: it trains and counts nothing but keeps the ranks in step.
    Random choices in collation (masked LM) come from a generator seeded by the batch's place,
    so a resumed run makes the same ones."""
    batches, tokens = [], 0
    for item in distributed.share(run.world, window):
        index, indices = item or window[0]
        group = [rows[int(i)] for i in indices]
        batch = to_device(run.collate(group, generator=batch_generator(run.cfg.seed, stream,
                                                                        index)),
                          run.precision.device)
        if item is None:
            batch["labels"].fill_(-100)
            if "side" in batch:  # preference rows: no pair or example either
                batch["side"].zero_()
        else:
            tokens += sum(len(r["input_ids"]) for r in group)
        batches.append(batch)
    return batches, tokens


def run_summary(run: Run, reason: str, message: str) -> dict[str, Any]:
    """What summary.json (or interrupted.json) says of a run."""
    state = run.state
    seconds = state.train_seconds
    return {
        "outcome": reason, "message": message, "steps": state.step,
        "total_steps": run.total_steps, "epochs": state.epoch + state.window_in_epoch
        / run.steps_per_epoch, "tokens": state.tokens, "trained_tokens": state.trained_tokens,
        "train_seconds": seconds, "trained_tokens_per_s": state.trained_tokens / seconds
        if seconds else 0.0, "tokens_per_s": state.tokens / seconds if seconds else 0.0,
        "mfu": run.mfu(state.tokens / seconds if seconds else 0.0),
        "skipped_steps": state.skipped_steps, "best_eval_loss": state.best_eval_loss,
        "final_eval": state.history[-1] if state.history else None,
        "peak_memory_bytes": peak_memory_bytes(run.precision.device),
        "trainable_params": run.trainable_params, "total_params": run.total_params,
        "precision": run.precision.name, "device": run.precision.device,
        "world_size": run.world.size, "strategy": run.world.strategy,
        "data": run.data.stats.as_dict() if hasattr(run.data.stats, "as_dict") else None,
    }
