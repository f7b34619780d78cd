"""Preference objectives as losses of the one loop: DPO, IPO, ORPO, SimPO and KTO.

A batch holds preference rows (strop.data.preference): each row's documents sit side by side,
position ids restarting at 0, and the `side` column says which is which. One forward of the
policy scores every document; the reference's log-probs come from the same model with its
adapter disabled (LoRA, QLoRA), or from a column computed once before training
(`ref_logps`: full fine-tuning, or precompute_ref_log_probs).

Each objective returns its loss as sums over units the loop normalises over the whole
accumulation window (as it does tokens for SFT): "pairs" (or "examples" for KTO), and "nll",
the chosen responses' tokens, for the NLL terms of RPO, ORPO and CPO. So a loss and its
gradients do not depend on how a step is split into micro-batches, and each term is the mean
TRL takes over a batch when the window is one batch.

Metrics are sums with their counts, so that they too average over the window: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (TRL's names).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from strop.data.preference import CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE
from strop.train.loss import IGNORE, OutputHead, token_logprobs

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (sum, count)


@dataclass(frozen=True)
class Objective:
    """The hyperparameters of one preference loss (from the config)."""

    name: str  # dpo, ipo, orpo, simpo, kto
    beta: float
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    orpo_alpha: float = 0.1
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def of(cls, cfg) -> Objective:
        return cls(cfg.rl, cfg.beta, cfg.dpo_label_smoothing, cfg.rpo_alpha,
                   cfg.orpo_alpha if cfg.orpo_alpha is not None else 0.1,
                   cfg.simpo_gamma if cfg.simpo_gamma is not None else 0.5,
                   cfg.cpo_alpha if cfg.cpo_alpha is not None else 0.0,
                   cfg.kto_desirable_weight, cfg.kto_undesirable_weight)

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen responses' token-mean NLL in the loss."""
        if self.name == "orpo":
            return 1.0
        if self.name == "simpo":
            return self.cpo_alpha
        if self.name in ("dpo", "ipo") and self.rpo_alpha:
            return self.rpo_alpha
        return 0.0

    @property
    def unit(self) -> str:
        return "examples" if self.name == "kto" else "pairs"

    @property
    def uses_reference(self) -> bool:
        return self.name in ("dpo", "ipo", "kto")


# ------------------------------------------------------------------------------ documents


@dataclass
class Documents:
    """Per-document sums of a batch's per-token values (B, T) at label positions."""

    index: torch.Tensor  # (B * T,) document of each token
    sides: torch.Tensor  # (D,) side of each document (0: padding)
    lengths: torch.Tensor  # (D,) trained tokens of each document

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> Documents:
        side = batch["side"]
        # A document starts at position 0 (every row's first token); the rejected response
        # of a row that shares its prompt starts where the side changes.
        changes = torch.zeros_like(side, dtype=torch.bool)
        changes[:, 1:] = side[:, 1:] != side[:, :-1]
        starts = ((batch["position_ids"] == 0) | changes).reshape(-1)
        index = torch.cumsum(starts.long(), 0) - 1
        sides = batch["side"].reshape(-1)[starts].long()
        trained = (batch["labels"] != IGNORE).reshape(-1).float()
        lengths = torch.zeros(len(sides), dtype=torch.float32, device=index.device)
        return cls(index, sides, lengths.index_add_(0, index, trained))

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(len(self.sides))
        return out.index_add(0, self.index, values.reshape(-1))

    def of_side(self, per_doc: torch.Tensor, side: int) -> torch.Tensor:
        return per_doc[self.sides == side]


def counts(batch: dict[str, torch.Tensor], objective: Objective) -> dict[str, int]:
    """The units a batch holds, before its forward: what the loop normalises by."""
    starts = batch["position_ids"] == 0
    side = batch["side"]
    if objective.name == "kto":
        out = {"examples": int((starts & ((side == DESIRABLE) | (side == UNDESIRABLE))).sum())}
    else:
        out = {"pairs": int((starts & (side == CHOSEN)).sum())}
    if objective.nll_weight:
        out["nll"] = int(((batch["labels"] != IGNORE) & (side == CHOSEN)).sum())
    return out


# ------------------------------------------------------------------------------- the loss


@dataclass
class PreferenceLossModel:
    """The loss model of a preference run: the same decoder and head as SFT's LossModel."""

    model: torch.nn.Module  # what the optimizer trains (HF model, maybe PEFT-wrapped)
    decoder: torch.nn.Module
    head: OutputHead
    objective: Objective
    precomputed: bool  # the batch carries the reference's log-probs (ref_logps)
    shift: bool = True

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return counts(batch, self.objective)

    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        # use_cache=False and no attention_mask: documents are kept apart by position_ids
        hidden = self.decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        return token_logprobs(hidden, batch["labels"], self.head,
                              position_ids=batch["position_ids"])

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's per-token log-probs: the column, or the model with its
        adapter disabled (no second copy of the weights)."""
        if self.precomputed:
            return batch["ref_logps"].float()
        with torch.no_grad(), disabled_adapter(self.model):
            return self.token_logprobs(batch)

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Metrics]:
        docs = Documents.of(batch)
        policy = docs.sums(self.token_logprobs(batch))  # (D,)
        reference = docs.sums(self.reference_logprobs(batch)) \
            if self.objective.uses_reference else None
        if self.objective.name == "kto":
            return kto_loss(self.objective, docs, policy, reference)
        return pair_loss(self.objective, docs, policy, reference)


@contextlib.contextmanager
def disabled_adapter(model: torch.nn.Module):
    """PEFT's own switch: the base model's outputs, with every adapter off."""
    model = getattr(model, "_orig_mod", model)
    with model.disable_adapter():
        yield


def pair_loss(objective: Objective, docs: Documents, policy: torch.Tensor,
              reference: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], Metrics]:
    """dpo, ipo, orpo, simpo over the batch's pairs: (loss sums by unit, metric sums)."""
    o = objective
    chosen_tokens = docs.of_side(docs.lengths, CHOSEN)
    rejected_tokens = docs.of_side(docs.lengths, REJECTED)
    chosen, rejected = docs.of_side(policy, CHOSEN), docs.of_side(policy, REJECTED)  # (P,)
    nll_sum = -chosen.sum()  # summed log-probs of the chosen tokens, before any averaging
    metrics: Metrics = {}
    if o.name in ("dpo", "ipo"):
        ref_chosen, ref_rejected = docs.of_side(reference, CHOSEN), docs.of_side(reference, REJECTED)
        # rewards and logged log-probs are of whole responses (sums), for ipo too (as TRL's)
        chosen_rewards = o.beta * (chosen - ref_chosen).detach()
        rejected_rewards = o.beta * (rejected - ref_rejected).detach()
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if o.name == "ipo":  # IPO's margin is between per-token log-ratios
            logits = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            losses = (logits - 1 / (2 * o.beta)) ** 2
        else:  # DPO; with label smoothing, conservative DPO (the labels flip with that chance)
            logits = chosen_ratio - rejected_ratio  # (P,)
            losses = -F.logsigmoid(o.beta * logits) * (1 - o.label_smoothing) \
                - F.logsigmoid(-o.beta * logits) * o.label_smoothing
        # ORPO and SimPO, without a reference, score mean log-probs per token
    else:
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
    if o.name == "simpo":
        logits = (chosen - rejected) - o.simpo_gamma / o.beta
        losses = -F.logsigmoid(o.beta * logits)
        chosen_rewards, rejected_rewards = o.beta * chosen.detach(), o.beta * rejected.detach()
    elif o.name == "orpo":  # log odds(chosen) - log odds(rejected), from mean log-probs
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen))
                                          - torch.log1p(-torch.exp(rejected)))
        ratio = F.logsigmoid(log_odds)
        losses = -o.orpo_alpha * ratio
        chosen_rewards = o.orpo_alpha * chosen.detach()
        rejected_rewards = o.orpo_alpha * rejected.detach()
        metrics["log_odds_ratio"] = _mean_of(ratio.detach())
        metrics["log_odds_chosen"] = _mean_of(log_odds.detach())
    sums = {"pairs": losses.sum()}
    if o.nll_weight:
        sums["nll"] = o.nll_weight * nll_sum
        metrics["nll_loss"] = (nll_sum.detach(), chosen_tokens.sum())
    metrics.update({
        "rewards/chosen": _mean_of(chosen_rewards),
        "rewards/rejected": _mean_of(rejected_rewards),
        "rewards/margins": _mean_of(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean_of((chosen_rewards > rejected_rewards).float()),
        "logps/chosen": _mean_of(chosen.detach()),
        "logps/rejected": _mean_of(rejected.detach()),
    })
    return sums, metrics


def kto_loss(objective: Objective, docs: Documents, policy: torch.Tensor,
             reference: torch.Tensor) -> tuple[dict[str, torch.Tensor], Metrics]:
    """KTO over the batch's examples: each completion's reward against a KL estimate, the
    batch's mean policy-vs-reference log-ratio on mismatched completions (detached, >= 0)."""
    o = objective
    ratio = policy - reference  # (D,)
    kl = docs.of_side(ratio, KL).detach().mean().clamp(min=0) if (docs.sides == KL).any() \
        else ratio.new_zeros(())
    good = docs.of_side(ratio, DESIRABLE)
    bad = docs.of_side(ratio, UNDESIRABLE)
    losses = torch.cat([o.desirable_weight * (1 - torch.sigmoid(o.beta * (good - kl))),
                        o.undesirable_weight * (1 - torch.sigmoid(o.beta * (kl - bad)))])
    chosen_rewards, rejected_rewards = o.beta * good.detach(), o.beta * bad.detach()
    metrics: Metrics = {
        "kl": (kl.detach(), torch.ones(())),
        "rewards/chosen": _mean_of(chosen_rewards),
        "rewards/rejected": _mean_of(rejected_rewards),
        "logps/chosen": _mean_of(docs.of_side(policy, DESIRABLE).detach()),
        "logps/rejected": _mean_of(docs.of_side(policy, UNDESIRABLE).detach()),
    }
    return {"examples": losses.sum()}, metrics


def _mean_of(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.sum(), torch.tensor(float(values.numel()))


def of(model: torch.nn.Module, loss_model: Any, cfg, precomputed: bool) -> PreferenceLossModel:
    """The preference loss model around the SFT loss model's decoder and head."""
    return PreferenceLossModel(model, loss_model.decoder, loss_model.head, Objective.of(cfg),
                               precomputed)


# -------------------------------------------------------------------- reference, precomputed

def precompute_reference(loss_model: PreferenceLossModel, rows, collate, batch_size: int,
                         device: str, autocast, world, lora: bool, alone: bool) -> np.ndarray:
    """The reference model's log-prob of every trained token of `rows` (0 elsewhere), as a
    per-token float32 column: one pass, no gradients, dropout off. The reference is the model
    as loaded from base_model (a resumed run scores before its checkpoint's weights load),
    with its adapter disabled under LoRA. Each rank scores a share of the batches and the shares
    are summed; `alone`: rank 0 scores them all (the other ranks hold no weights yet)."""
    from strop.data.batches import BatchPlan
    from strop.train import distributed
    from strop.train.run import to_device

    values = np.zeros(rows.num_tokens, dtype=np.float32)
    plan = BatchPlan(rows, batch_size, seed=0, shuffle=False)
    model = loss_model.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast, disabled_adapter(model) if lora \
                else contextlib.nullcontext():
            for k, indices in enumerate(plan.epoch(0)):
                if (world.rank if alone else k % world.size) != (0 if alone else world.rank):
                    continue
                batch = to_device(collate([rows.arrays(int(i)) for i in indices]), device)
                scored = loss_model.token_logprobs(batch).cpu().numpy()  # (B, T)
                for j, i in enumerate(indices):
                    a, b = int(rows.offsets[i]), int(rows.offsets[i + 1])
                    values[a:b] = scored[j, :b - a]
    finally:
        model.train(was_training)
    return distributed.all_sum_array(world, values)




def loss_model_for_run(cfg, model: torch.nn.Module, loss_model: Any, data, tokenizer, decisions,
                       world) -> PreferenceLossModel:
    """The preference loss model of a run; the reference's log-probs scored now, before any
    weight moves, when the run has no live reference (full fine-tuning: no second copy of the
    model) or asks for them (precompute_ref_log_probs). `data` (PreparedData) gets them as
    its rows' `ref_logps` column."""
    import time

    from strop.data.batches import make_collator
    from strop.model.attention import varlen_attention
    from strop.train.forward import unwrap

    precision = decisions.precision
    precomputed = cfg.uses_reference and (cfg.precompute_ref_log_probs or not cfg.uses_lora)
    scorer = of(model, loss_model, cfg, precomputed)
    if not precomputed:
        return scorer
    started = time.perf_counter()
    # the attention training runs with (rows that share their prompt need it)
    hf = unwrap(model)
    attention = (lambda: varlen_attention(hf)) if decisions.varlen else contextlib.nullcontext
    collate = make_collator(cfg, tokenizer)
    alone = world.strategy == "fsdp" and cfg.fsdp.cpu_ram_efficient_loading
    for split in ("train", "eval"):
        rows = getattr(data, split)
        if rows is None or not len(rows):
            continue
        with attention():
            values = precompute_reference(scorer, rows, collate, cfg.effective_eval_batch_size,
                                          precision.device, precision.autocast(), world,
                                          cfg.uses_lora, alone)
        setattr(data, split, rows.with_column("ref_logps", values))
    if world.main:
        print(f"scored the reference's log-probs in {time.perf_counter() - started:.1f}s",
              flush=True)
    return scorer
