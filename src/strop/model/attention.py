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
    """(start, end) of each segment in each row: a new document starts where position is 0,
    and a branch (see `segments`) where the positions go back without reaching 0."""
    return [[(start, end) for start, end, _ in row] for row in segments(position_ids)]


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """(start, end, prefix) of each segment of each row.

    A segment starts where position is 0 (a new document: prefix 0), or where the positions go
    back to some p > 0: a branch, which continues its document's first p tokens as a second
    ending. A preference pair laid as prompt, chosen, rejected has positions 0..p+c-1 then
    p..p+r-1: the rejected response attends to the prompt (the document's first p tokens) and to
    itself, never to the chosen one, so the prompt is computed once for both.
    """
    out = []
    length = position_ids.shape[1]
    for row in position_ids:
        jumps = torch.ones(length, dtype=torch.bool, device=row.device)
        jumps[1:] = row[1:] != row[:-1] + 1
        starts = torch.nonzero(jumps).flatten().tolist()
        values = row[starts].tolist()
        ends = [*starts[1:], length]
        out.append([(start, end, int(value)) for start, end, value in
                    zip(starts, ends, values, strict=True)])
    return out


# PyTorch's CPU flash attention keeps a few MiB for every sequence length its bf16 backward has
# seen and never frees them (torch 2.13: 120 random lengths, +730 MiB; fp32 and forward-only
# calls do not). Training on documents of every length would grow without bound, so lengths
# are padded up to a few fixed sizes: steps of 1/16 of the next power of two, at least 16
# (16, 32, ..., 256, 288, ..., 512, 576, ..., 1024): 32 sizes up to 1024, 8 more per doubling
# (the same 120 lengths: +123 MiB, levelling off).
# Padding adds under 16 tokens or an eighth of the length, whichever is more; a fixed multiple
# of 64 cost 20% of the demo's pretraining speed (documents of a few dozen tokens). Causal
# attention lets the padding go at the end: no real query sees a padded key, and the padded
# queries' outputs are dropped, so results and gradients are unchanged.
MIN_STEP = 16


def padded_length(length: int) -> int:
    """The size a CPU training attention of `length` tokens runs at (see above)."""
    step = max(MIN_STEP, (1 << (length - 1).bit_length()) // 16)
    return -(-length // step) * step


# Under torch.compile the length is symbolic: padded_length's power-of-two step would make the
# graph guard on the length's range and recompile for each one. A fixed step (16 sizes up to
# 1024) rounds it up symbolically, and the padding is then applied without asking whether any
# is needed, since a branch on it would guard too.
COMPILED_STEP = 64


def _training_length(query) -> int | None:
    """The length a CPU training attention runs at (see above), or None to run as it is."""
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return None
    length = query.shape[2]
    if torch.compiler.is_compiling():
        return -(-length // COMPILED_STEP) * COMPILED_STEP
    padded = padded_length(length)
    return padded if padded != length else None


def _causal_sdpa(query, key, value, **kwargs):
    """Causal SDPA of (B, H, L, D) inputs, returned as (B, L, H, D)."""
    length = query.shape[2]
    padded = _training_length(query)
    if padded is not None:
        query, key, value = (F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, **kwargs)
    out = out.transpose(1, 2)  # the layout the CPU flash kernel writes: no copy
    return out if padded is None else out[:, :length]


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """query: (B, H, T, D); key, value: (B, Hkv, T, D). Returns (B, T, H, D), None."""
    options = dict(dropout_p=dropout, scale=scaling,
                   # SDPA repeats the kv heads itself
                   enable_gqa=getattr(module, "num_key_value_groups", 1) > 1)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[0] == query.shape[0]:
        out = _packed_attention(query, key, value, position_ids, options)
        if out is not None:
            return out, None
    return _causal_sdpa(query, key, value, **options).contiguous(), None


# Eager even under torch.compile: the documents' lengths are read from position_ids, so a traced
# version would break the graph there and then recompile for every new set of lengths.
@torch.compiler.disable
def _packed_attention(query, key, value, position_ids, options) -> torch.Tensor | None:
    """Causal attention within each packed document (and each branch with its document's
    prefix), or None when no row is packed."""
    if not bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any()):
        return None
    if bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).logical_and(
            position_ids[:, 1:] != 0).any()):
        return _branched_attention(query, key, value, position_ids, options)
    # split/cat rather than slicing and writing into an output tensor: their backward passes
    # concatenate, where a slice's backward writes each document's gradient into a zero tensor
    # of the whole row (measured: a tenth of a packed step on a CPU). Each piece stays 4-D
    # (1, H, L, D): on 3-D inputs the CPU's SDPA leaves its flash kernel for the math one, which
    # keeps fp32 copies of q, k, v and the (H, L, L) probabilities for backward.
    rows = []
    for q_row, k_row, v_row, spans in zip(query.split(1), key.split(1), value.split(1),
                                          document_spans(position_ids), strict=True):
        lengths = [end - start for start, end in spans]
        rows.append(torch.cat([
            _causal_sdpa(q, k, v, **options)
            for q, k, v in zip(q_row.split(lengths, dim=2), k_row.split(lengths, dim=2),
                               v_row.split(lengths, dim=2), strict=True)], dim=1))
    return torch.cat(rows)  # contiguous: cat writes a new tensor


def _branched_attention(query, key, value, position_ids, options) -> torch.Tensor:
    """_packed_attention for rows with branches: a branch's queries see the keys of its
    document's prefix, then its own causally (a bottom-right aligned causal mask)."""
    rows = []
    for q_row, k_row, v_row, spans in zip(query.split(1), key.split(1), value.split(1),
                                          segments(position_ids), strict=True):
        pieces, document = [], 0
        for start, end, prefix in spans:
            q = q_row[:, :, start:end]
            if prefix == 0:
                document = start
                pieces.append(_causal_sdpa(q, k_row[:, :, start:end], v_row[:, :, start:end],
                                           **options))
                continue
            shared = slice(document, document + prefix)
            k = torch.cat([k_row[:, :, shared], k_row[:, :, start:end]], dim=2)
            v = torch.cat([v_row[:, :, shared], v_row[:, :, start:end]], dim=2)
            length = end - start
            mask = torch.ones(length, prefix + length, dtype=torch.bool,
                              device=q.device).tril(prefix)
            pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
                          .transpose(1, 2))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


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
