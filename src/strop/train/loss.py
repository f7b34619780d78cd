"""The training loss, in one place.

Causal LM: the loss is computed only where a label is trained. The decoder's hidden states of
those positions are gathered *before* the output head, and the head + cross-entropy run in
chunks inside one autograd function that produces its gradients in the forward pass, so the
(tokens x vocab) logits tensor never exists in full, not even for backward.

Normalisation: every function here returns a *sum* of per-token losses and the token count.
The loop divides by the trained tokens of the whole accumulation window, so the loss and the
gradients are the same whatever the split between micro_batch_size and
gradient_accumulation_steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from strop.recipe.decide import LOSS_CHUNK_ROWS

IGNORE = -100


def trained_positions(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Boolean mask (B, T) of positions whose prediction is trained.

    With `shift`, position t predicts token t+1 (causal LM), so the mask is over the inputs:
    mask[:, t] = labels[:, t + 1] != -100, and the last position predicts nothing.
    """
    if not shift:
        return labels != IGNORE
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def count_trained_tokens(labels: torch.Tensor, shift: bool = True) -> int:
    return int(trained_positions(labels, shift).sum())


def _targets(labels: torch.Tensor, mask: torch.Tensor, shift: bool) -> torch.Tensor:
    if not shift:
        return labels[mask]
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    return shifted[mask]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(CE(h @ W.T + b, y)) over rows, in chunks; gradients computed in the forward pass.

    Saved for backward: grad_h (N, H) and grad_W (V, H) (only when W trains) instead of the
    (N, V) logits. Valid because the loss is a scalar the loop only scales.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, dtype: torch.dtype):
        # hidden: (N, H), weight: (V, H), bias: (V,) or None, targets: (N,)
        n = hidden.shape[0]
        w = weight.to(dtype)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows].to(dtype)  # (C, H)
            y = targets[start:start + chunk_rows]  # (C,)
            logits = (h @ w.T).float()  # (C, V) in fp32 for a stable softmax
            if bias is not None:
                logits += bias.float()
            # logsumexp and softmax from one exp pass, in place: logsumexp, then exp(x - lse),
            # exponentiates the (C, V) logits twice (4096 x 512 -> 8192 on a 2-core CPU: 407-425
            # ms that way, 359-386 this way, of which 256 are matmuls).
            row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
            target_logits = logits.gather(1, y[:, None]).squeeze(1)  # (C,)
            grad_logits = logits.sub_(row_max).exp_()
            sums = grad_logits.sum(dim=-1, keepdim=True)  # (C, 1)
            total += (row_max + sums.log()).squeeze(1).sub_(target_logits).sum()
            grad_logits.div_(sums)  # softmax
            grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            g = grad_logits.to(dtype)
            grad_h[start:start + chunk_rows] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ h).float()
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            # Free this chunk's (C, V) tensors now: held until the next chunk rebinds the names,
            # they would sit beside its logits, 12 B per logit at the peak instead of 6.
            del logits, grad_logits, g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.input_dtype = hidden.dtype
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.input_dtype)
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.weight_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


@dataclass(frozen=True)
class OutputHead:
    """How to turn hidden states into logits: a plain linear layer (fast path), or any module."""

    module: nn.Module
    softcap: float | None = None  # Gemma 2's final_logit_softcapping
    scale: float | None = None  # Cohere's logit_scale

    def linear(self) -> nn.Linear | None:
        """The plain nn.Linear behind the head, when the fused path can use it."""
        if self.softcap or self.scale:
            return None
        module = self.module
        # PEFT's modules_to_save wraps the head; the active copy is a plain Linear.
        saved = getattr(module, "modules_to_save", None)
        if saved is not None and getattr(module, "active_adapter", None) in saved:
            module = saved[module.active_adapter]
        if type(module) is nn.Linear:
            return module
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.module(hidden)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if self.scale:
            out = out * self.scale
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out



def _head_dtype(selected: torch.Tensor, linear: nn.Linear) -> torch.dtype:
    """The dtype the chunked head multiplies in: autocast's when it is on, else the hidden
    states' (or the head's, under fp32 hidden states)."""
    if torch.is_autocast_enabled(selected.device.type):
        return torch.get_autocast_dtype(selected.device.type)
    return selected.dtype if selected.dtype != torch.float32 else linear.weight.dtype


def lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: OutputHead, *, shift: bool = True,
                chunk_rows: int = LOSS_CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over trained positions, and how many there are.

    hidden: (B, T, H) final hidden states; labels: (B, T) with -100 where not trained.
    """
    mask = trained_positions(labels, shift)  # (B, T)
    n = int(mask.sum())
    if n == 0:  # keep the graph connected so backward still runs (and frees) as usual
        return hidden.sum() * 0.0, 0
    selected = hidden[mask]  # (N, H)
    targets = _targets(labels, mask, shift)  # (N,)
    linear = head.linear()
    if linear is not None:
        with torch.autocast(selected.device.type, enabled=False):
            total = _LinearCrossEntropy.apply(selected, linear.weight, linear.bias, targets,
                                              chunk_rows, _head_dtype(selected, linear))
        return total, n
    # Any other head: chunked, each chunk recomputed in backward so logits are never all kept.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss, selected[start:start + chunk_rows], targets[start:start + chunk_rows],
            head, use_reentrant=False)
    return total, n


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead) -> torch.Tensor:
    return F.cross_entropy(head.logits(hidden), targets, reduction="sum")


def reference_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Plain full-logits cross-entropy sum: the definition the fast paths are tested against."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# ------------------------------------------------------------------------ per-token log-probs


class _LinearLogProb(torch.autograd.Function):
    """log softmax(h @ W.T + b)[y] for each row, in chunks, for a head that does not train.

    A preference loss weighs each sequence's log-prob by a factor known only after every
    sequence is scored, so the head's gradient cannot be summed in the forward pass as
    _LinearCrossEntropy does. What can: d logp_i / d h_i = (onehot(y_i) - softmax_i) @ W,
    one (H,) row per token, saved instead of the (N, V) logits; backward scales each row by its
    token's incoming gradient. W itself gets no gradient (a frozen head: LoRA, or a full
    fine-tune whose head is tied or frozen takes the checkpointed path instead).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, dtype: torch.dtype):
        # hidden: (N, H), weight: (V, H), targets: (N,)
        n = hidden.shape[0]
        w = weight.to(dtype)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows].to(dtype)  # (C, H)
            y = targets[start:start + chunk_rows]  # (C,)
            logits = (h @ w.T).float()  # (C, V)
            if bias is not None:
                logits += bias.float()
            row_max = logits.amax(dim=-1, keepdim=True)
            target_logits = logits.gather(1, y[:, None]).squeeze(1)
            probs = logits.sub_(row_max).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            out[start:start + chunk_rows] = target_logits - (row_max + sums.log()).squeeze(1)
            probs.div_(sums).neg_()  # -softmax ...
            probs[torch.arange(y.shape[0], device=y.device), y] += 1.0  # ... + onehot
            grad_h[start:start + chunk_rows] = probs.to(dtype) @ w
            del logits, probs
        ctx.save_for_backward(grad_h)
        ctx.input_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out[:, None]).to(ctx.input_dtype), None, None, None, None, None


def _logprobs_plain(hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead,
                    chunk_rows: int) -> torch.Tensor:
    """Per-row target log-probs through any head, a chunk at a time; under autograd each chunk
    is recomputed in backward, so its logits are never all kept."""
    def chunk(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head.logits(h)  # (C, V), fp32
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    parts = []
    for start in range(0, targets.shape[0], chunk_rows):
        h, y = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        parts.append(torch.utils.checkpoint.checkpoint(chunk, h, y, use_reentrant=False)
                     if torch.is_grad_enabled() else chunk(h, y))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def label_sources(labels: torch.Tensor, position_ids: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained label positions (B, T) and, for each in row-major order, the flat index into
    (B * T) of the hidden state that predicts it: the token before it, except at the start of a
    branch (strop.model.attention.segments), whose first token follows its document's prefix."""
    batch, length = labels.shape
    columns = torch.arange(length, device=labels.device).expand(batch, length)
    jumps = torch.ones_like(labels, dtype=torch.bool)
    jumps[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    mask = (labels != IGNORE) & (position_ids != 0)
    mask[:, 0] = False  # nothing predicts a row's first token
    # each token's document start: the last column at or before it with position 0
    starts = torch.where(position_ids == 0, columns, torch.zeros_like(columns)).cummax(1).values
    before = torch.where(jumps, starts + position_ids - 1, columns - 1)  # (B, T)
    rows = torch.arange(batch, device=labels.device)[:, None] * length
    return mask, (before + rows)[mask]


def token_logprobs(hidden: torch.Tensor, labels: torch.Tensor, head: OutputHead, *,
                   position_ids: torch.Tensor | None = None,
                   chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """log p(label_t | tokens < t) at every trained label position, 0 elsewhere: (B, T) fp32.

    hidden: (B, T, H) final hidden states of a causal LM; labels: (B, T), -100 where not
    trained; position_ids (B, T), when rows may hold branches that share a prefix. Only trained
    positions go through the head.
    """
    if position_ids is not None:
        label_mask, sources = label_sources(labels, position_ids)
        targets = labels[label_mask]  # (N,)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sources)  # (N, H)
    else:
        mask = trained_positions(labels, shift=True)  # (B, T): position t predicts label t + 1
        targets = _targets(labels, mask, shift=True)  # (N,)
        selected = hidden[mask]  # (N, H)
        label_mask = torch.zeros_like(mask)  # at the label's own position
        label_mask[:, 1:] = mask[:, :-1]
    linear = head.linear()
    if linear is not None and not linear.weight.requires_grad and \
            (linear.bias is None or not linear.bias.requires_grad):
        with torch.autocast(selected.device.type, enabled=False):
            values = _LinearLogProb.apply(selected, linear.weight, linear.bias, targets,
                                          chunk_rows, _head_dtype(selected, linear))
    else:
        values = _logprobs_plain(selected, targets, head, chunk_rows)
    out = hidden.new_zeros(labels.shape, dtype=torch.float32)
    return out.masked_scatter(label_mask, values)


def reference_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain full-logits log-probs at label positions: what token_logprobs is tested against."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:].clamp(min=0)
    values = logp.gather(2, targets[..., None]).squeeze(-1)  # (B, T-1)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    out[:, 1:] = torch.where(labels[:, 1:] != IGNORE, values, 0.0)
    return out
