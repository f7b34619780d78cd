"""Training attention without a mask tensor: causal SDPA per document.

SDPA with a (B, 1, T, T) mask is what transformers does for packed rows (a block-diagonal mask
built from position_ids) and for padded rows. On a CPU that costs twice: the mask is built for
every forward, and the attention kernel computes all T x T scores with the mask applied, where
a causal kernel skips the upper triangle. For training batches neither is needed:

- packed rows: documents are found from position_ids (each restarts at 0), and each one runs
  causal SDPA on its own slice, so the work is sum(L_i^2 / 2) instead of T^2;
- right-padded rows: real tokens come before the padding, so plain causal attention already
  keeps them from seeing it (the padding's own outputs are never trained).

This is transformers' attention extension point (`AttentionInterface.register`), not a patch:
strop selects it for training with `use_varlen_attention` and restores the model's own
implementation before the model is saved or used for generation (left padding, caches).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "strop_varlen_sdpa"
# Architectures whose attention is plain causal self-attention with RoPE on position_ids,
# which is what this implementation assumes.
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "granite"}


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each document in each row: a new document starts where position is 0."""
    spans = []
    length = position_ids.shape[1]
    for row in position_ids:
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        ends = [*starts[1:], length]
        spans.append(list(zip(starts, ends, strict=True)))
    return spans


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """query: (B, H, T, D); key, value: (B, Hkv, T, D). Returns (B, T, H, D), None."""
    gqa = getattr(module, "num_key_value_groups", 1) > 1  # SDPA repeats the kv heads itself
    position_ids = kwargs.get("position_ids")
    packed = position_ids is not None and position_ids.shape[0] == query.shape[0] and \
        bool((position_ids[:, 1:] == 0).any())
    if not packed:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                             scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    # unbind/split/cat rather than slicing and writing into an output tensor: their backward
    # passes stack and concatenate, where a slice's backward writes each document's gradient
    # into a zero tensor of the whole row (measured: a tenth of a packed step on a CPU).
    rows = []
    for q_row, k_row, v_row, spans in zip(query.unbind(0), key.unbind(0), value.unbind(0),
                                          document_spans(position_ids), strict=True):
        lengths = [end - start for start, end in spans]
        rows.append(torch.cat([
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(q_row.split(lengths, dim=1), k_row.split(lengths, dim=1),
                               v_row.split(lengths, dim=1), strict=True)], dim=1))
    out = torch.stack(rows)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the attention above needs no mask tensor (see module docstring)


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    _registered = True


def supports_varlen(config, sequence_len: int) -> bool:
    """Whether a model's attention is the plain causal kind this implementation reproduces."""
    if getattr(config, "model_type", None) not in SUPPORTED:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < sequence_len:
        return False
    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager", None)


@contextlib.contextmanager
def varlen_attention(model):
    """Train with the mask-free attention; the model's own implementation comes back after."""
    register()
    original = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
