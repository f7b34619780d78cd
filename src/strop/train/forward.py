"""One forward pass to a summed loss, for training and evaluation alike.

A causal LM runs its decoder (the HF model's `base_model`, final norm included) and the loss
gathers the trained positions before the output head (strop.train.loss). A masked LM runs the
whole model: its head is not a plain projection, and masked positions are few anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from strop.train.loss import OutputHead, count_trained_tokens, lm_loss_sum, reference_loss_sum


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper or a torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@dataclass
class LossModel:
    model: nn.Module  # what the optimizer trains (HF model, maybe PEFT-wrapped)
    decoder: nn.Module | None  # hidden states before the head (None: masked LM, full forward)
    head: OutputHead | None
    shift: bool

    @classmethod
    def of(cls, model: nn.Module, objective: str) -> LossModel:
        hf = unwrap(model)
        if objective == "masked_lm":
            return cls(model, None, None, shift=False)
        decoder = getattr(hf, "base_model", None)
        if decoder is None or decoder is hf:
            decoder = hf.get_decoder()
        config = hf.config
        head = OutputHead(hf.get_output_embeddings(),
                          softcap=getattr(config, "final_logit_softcapping", None),
                          scale=getattr(config, "logit_scale", None))
        return cls(model, decoder, head, shift=True)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """What the batch's loss is normalised by: its trained tokens."""
        if self.decoder is None:
            return {"tokens": int((batch["labels"] != -100).sum())}
        return {"tokens": count_trained_tokens(batch["labels"], self.shift)}

    def parts(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """The loss's sums by unit (one: tokens) and metric sums (none): the form every loss
        model gives the loop (strop.train.preference has two units and metrics)."""
        return {"tokens": self.loss_sum(batch)[0]}, {}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's trained tokens, and their count."""
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.decoder is None:
            logits = self.model(**inputs).logits  # (B, T, V)
            n = int((labels != -100).sum())
            return reference_loss_sum(logits, labels, shift=False), n
        # use_cache=False matters: with no cache and no attention_mask, transformers reads packed
        # documents from position_ids and masks them from each other.
        hidden = self.decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        return lm_loss_sum(hidden, labels, self.head, shift=self.shift)
