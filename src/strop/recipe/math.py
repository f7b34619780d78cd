"""Transformer math: FLOPs per token, bytes of weights, optimizer states and activations.

Plain functions of sizes (`ModelShape`) and settings, no torch import, shared by `strop plan`
and the training loop's tokens/s -> MFU figure. Units are in the names: `_bytes` are bytes,
`_flops` are floating-point operations (a multiply-add is 2).

Activation bytes follow what autograd really keeps for the Llama-family decoder layer in
transformers (RMSNorm, rotary attention, gated MLP), checked tensor by tensor against a
saved-tensors hook in tests/unit/plan/test_activations.py:
- RMSNorm computes in fp32: it keeps an fp32 copy of its input (4 B/elem) and the fp32
  reciprocal RMS (4 B/token); a trainable norm weight also keeps the normalised output.
- Under autocast every linear casts its input to the compute dtype itself, so q, k and v each
  keep their own copy when the residual stream is fp32; a frozen linear keeps no input at all
  (only its weight, which is already counted), since it needs no weight gradient.
- PEFT's LoRA casts its input to the adapter dtype (fp32) and autocast casts it back, so each
  wrapped linear keeps a compute-dtype copy of its input plus the rank-r product A x.
- SDPA / flash attention keep q, k, v (k and v at kv-head width), the output and an fp32
  log-sum-exp per head; eager attention keeps the T x T scores (fp32 softmax output and its
  compute-dtype copy) and k, v repeated to every query head.
"""

from __future__ import annotations

import math
from typing import Any

from strop.recipe.shape import ModelShape, model_shape

FP32 = 4
INT64 = 8

# bitsandbytes 4-bit: 64 weights share one absmax scale (bnb's default blocksize for 4-bit).
NF4_BLOCK = 64
# Double quantization stores those absmax scales in 8 bits, 256 scales per fp32 second-level
# scale: 4 + 32/64 = 4.5 bits per weight become 4 + 8/64 + 32/(64*256) = 4.127, a saving of
# about 0.373 bits per parameter (the QLoRA paper's figure).
NF4_DOUBLE_QUANT_BLOCK = 256
# bitsandbytes 8-bit optimizers quantize each state in blocks of 256 with an fp32 absmax, and
# keep tensors under 4096 elements in fp32 (min_8bit_size).
OPTIM_8BIT_BLOCK = 256
OPTIM_8BIT_MIN_SIZE = 4096


# ----------------------------------------------------------------------------- FLOPs

def attention_forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """q k^T and attention x v: 2 matmuls x 2 FLOPs x seq_len x q_dim per layer per token.

    Counted over the full seq_len x seq_len square (PaLM's MFU convention), not the causal half.
    """
    return 4.0 * shape.layers * seq_len * shape.q_dim


def training_flops_per_token(hf_config: Any, seq_len: int, trainable_params: int | None = None,
                             total_params: int | None = None, *, recompute: bool = False,
                             trainable_in_base: int = 0) -> float:
    """FLOPs to train on one token: forward, backward and (with `recompute`) the forward again
    that gradient checkpointing adds.

    hf_config: a transformers config (or a ModelShape). seq_len: tokens per row; the attention
    term grows with it. trainable_params / total_params: leave them out, or make them equal, for
    full training: 6N + 12 * L * seq_len * q_dim (forward 2N + 4LTq; backward twice that, for
    input and weight gradients). When fewer are trainable, they are taken as adapter matrices
    on a frozen base: the base costs 4N (forward and input gradients, no weight gradients), the
    adapters 6 per parameter, attention still 12LTq. trainable_in_base: trainable parameters
    that replace base matmul weights (LoRA modules_to_save such as lm_head), which add their
    weight gradient (2 per parameter) instead of 6. For MFU, leave recompute False: model FLOPs
    are the convention; the time estimate uses recompute=True to count the work the device does.
    """
    shape = hf_config if isinstance(hf_config, ModelShape) else model_shape(hf_config)
    n = float(shape.matmul_params_per_token)
    attention = attention_forward_flops_per_token(shape, seq_len)
    full = trainable_params is None or (total_params is not None and trainable_params >= total_params)
    if full:
        flops = 6.0 * n + 3.0 * attention
        extra_forward = 2.0 * n + attention
    else:
        adapters = float(trainable_params) - trainable_in_base
        flops = 4.0 * n + 6.0 * adapters + 2.0 * trainable_in_base + 3.0 * attention
        extra_forward = 2.0 * n + 2.0 * adapters + attention
    return flops + (extra_forward if recompute else 0.0)


# ----------------------------------------------------------------------------- weights

def nf4_bytes(numel: int, double_quant: bool, linears: int = 1) -> float:
    """Bytes of `numel` weights in bitsandbytes 4-bit: packed 4-bit codes plus block scales.

    Each quantized linear also keeps small lookup tables (16 fp32 NF4 codes, and with double
    quantization a 256-entry fp32 map and one fp32 offset): about 1 KiB per layer.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    codes = numel / 2
    if double_quant:
        scales = blocks * 1 + math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK) * FP32
        tables = linears * (16 * FP32 + 256 * FP32 + FP32)
    else:
        scales = blocks * FP32
        tables = linears * 16 * FP32
    return codes + scales + tables


def nf4_bits_per_param(double_quant: bool) -> float:
    """4.5 bits without double quantization, about 4.127 with it."""
    if double_quant:
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK)
    return 4 + 32 / NF4_BLOCK


def int8_bytes(numel: int, rows: int) -> float:
    """LLM.int8 weights: one byte each plus an fp32 scale per output row."""
    return numel + rows * FP32


# ----------------------------------------------------------------------------- optimizer

def optimizer_state_bytes(optimizer: str, shapes: list[tuple[int, ...]] | tuple,
                          sgd_momentum: float = 0.0) -> float:
    """Bytes the optimizer keeps for trainable fp32 tensors of these shapes."""
    total = 0.0
    for shp in shapes:
        n = math.prod(shp)
        if optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
            total += 2 * FP32 * n  # first and second moments
        elif optimizer in ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"):
            total += _eight_bit(n, states=2)
        elif optimizer == "lion_8bit":
            total += _eight_bit(n, states=1)
        elif optimizer == "sgd":
            total += FP32 * n if sgd_momentum > 0 else 0
        elif optimizer == "adafactor":
            # Factored second moment: a row and a column vector per matrix (no first moment,
            # as transformers' Adafactor defaults to beta1=None); vectors keep a full one.
            total += FP32 * (sum(shp[-2:]) if len(shp) >= 2 else n)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return total


def _eight_bit(n: int, states: int) -> float:
    if n < OPTIM_8BIT_MIN_SIZE:
        return states * FP32 * n
    return states * (n + math.ceil(n / OPTIM_8BIT_BLOCK) * FP32)


def optimizer_step_temp_bytes(optimizer: str, device: str, trainable: int, largest: int) -> float:
    """Working memory inside optimizer.step(), beyond the states.

    torch's AdamW on CUDA defaults to the foreach path, whose _foreach_sqrt of the second
    moments allocates one fp32 copy of every trainable tensor at once; on CPU (single-tensor
    path) it allocates that copy one tensor at a time. The fused kernels and bitsandbytes'
    8-bit kernels update in place.
    """
    if optimizer == "adamw_torch":
        return FP32 * (trainable if device == "cuda" else largest)
    if optimizer == "adafactor":
        return FP32 * largest  # the update is formed in a temporary per tensor
    return 0.0


# ----------------------------------------------------------------------------- activations

def layer_activation_bytes(shape: ModelShape, seq_len: int, *, attention: str, mode: str,
                           compute_bytes: int, residual_bytes: int, projection_bytes: int,
                           lora_inputs: list[tuple[int, int, str | None]] = (), lora_dropout: bool = False,
                           norms_trainable: bool = False, lean_norms: bool = False,
                           lean_swiglu: bool = False) -> float:
    """Bytes one decoder layer keeps for backward, per token of a row `seq_len` long.

    mode: "full" (every linear trains), or an adapter mode (frozen base). compute_bytes: the
    autocast dtype (2 for bf16/fp16, 4 without autocast). residual_bytes: dtype of the residual
    stream (fp32 when embeddings and norms are fp32, as for full training or a k-bit base).
    projection_bytes: dtype the base projections return (a bitsandbytes 4-bit linear returns
    its input's dtype, so fp32 under QLoRA). lora_inputs: (in_features, rank, what it reads) of
    each wrapped linear in this layer (see lora_reads). lean_norms / lean_swiglu: the loop's
    lean RMSNorm and SwiGLU (strop.train.lean_activations) replace transformers' modules.
    """
    d, c = shape.hidden, compute_bytes
    if lean_norms:  # the input as it came and 1/rms per token
        per_norm = residual_bytes * d + FP32
    else:  # an fp32 copy of the input and 1/rms; a trained weight also keeps the normed input
        per_norm = FP32 * d + FP32 + (residual_bytes * d if norms_trainable else 0)
    total = 2 * per_norm
    # Attention core.
    if attention == "eager":
        repeated = shape.q_dim if shape.kv_heads < shape.heads else shape.kv_dim
        total += c * (shape.q_dim + 2 * repeated)             # q, k^T and v at query width
        total += (FP32 + c) * shape.heads * seq_len           # fp32 softmax + its cast copy
        if mode == "full":
            total += c * shape.q_dim                          # o_proj's contiguous input copy
    else:  # sdpa, flash_attention_2/3, flex_attention
        total += c * (shape.q_dim + 2 * shape.kv_dim)         # q, k, v after rotary
        total += FP32 * shape.heads                           # log-sum-exp
        total += c * shape.q_dim                              # output (o_proj reads the same)
    # MLP core: the activation's input and output and the up projection (gated), or the
    # activation's input and output (plain 2-matrix MLP). The lean SwiGLU keeps gate and up
    # only, and rebuilds down_proj's input from them in backward.
    width = shape.intermediate * shape.experts_per_token
    lean_swiglu = lean_swiglu and shape.gated_mlp
    total += (2 if lean_swiglu else 3 if shape.gated_mlp else 2) * projection_bytes * width
    if mode == "full":
        if residual_bytes != c:
            # autocast casts the normed fp32 input once per consuming linear
            total += c * d * (5 if shape.gated_mlp else 2)
        if shape.gated_mlp and not lean_swiglu:
            total += projection_bytes * width  # down_proj's input
    # LoRA's A keeps its input for its weight gradient. strop turns off PEFT's input casts, so
    # an input already in the compute dtype is kept once however many adapters read it: q, k
    # and v read the same normed input, gate and up another (on a k-bit base the norms and
    # stream are fp32 and each adapter keeps its own cast copy instead); o_proj reads SDPA's
    # output, counted above (eager's output is a fresh contiguous copy). Dropout gives each
    # adapter its own input.
    kept_inputs: set[str] = {"attention_output"} if attention != "eager" else set()
    for in_features, rank, reads in lora_inputs:
        if reads == "mlp_product":  # down_proj's input: its own, or rebuilt by the lean SwiGLU
            rebuilt = lean_swiglu and not lora_dropout and projection_bytes == c
            total += c * rank + (0 if rebuilt else c * in_features) + \
                (in_features if lora_dropout else 0)
            continue
        shared = reads is not None and not lora_dropout and \
            (reads == "attention_output" or residual_bytes == c)
        if not shared or reads not in kept_inputs:
            total += c * in_features
        if shared:
            kept_inputs.add(reads)
        total += c * rank                                     # A x, kept for B's gradient
        if lora_dropout:
            total += in_features                              # dropout mask (1 byte per element)
    return total


# What each wrapped linear reads, by the name families use: adapters reading the same tensor
# can share the copy autograd keeps of it.
LORA_INPUTS = {"q_proj": "attention_input", "k_proj": "attention_input",
               "v_proj": "attention_input", "o_proj": "attention_output",
               "gate_proj": "mlp_input", "up_proj": "mlp_input", "down_proj": "mlp_product"}


def lora_reads(module_name: str) -> str | None:
    """Which shared input a wrapped linear reads (LORA_INPUTS), None when it is its own."""
    return LORA_INPUTS.get(module_name.rsplit(".", 1)[-1])


def checkpointed_layer_bytes(shape: ModelShape, residual_bytes: int) -> float:
    """Gradient checkpointing keeps only each layer's input, per token."""
    return residual_bytes * shape.hidden


def head_activation_bytes(shape: ModelShape, *, mode: str, compute_bytes: int,
                          residual_bytes: int, head_trainable: bool) -> float:
    """The final norm and the output head's input kept for backward, per token."""
    d = shape.hidden
    total = FP32 * d + FP32 + (residual_bytes * d if mode == "full" else 0)
    if head_trainable and residual_bytes != compute_bytes:
        total += compute_bytes * d  # the head's cast input (needed for its weight gradient)
    return total + INT64  # the int64 label per token the loss keeps


def logits_peak_bytes(vocab: int, tokens: int, chunk_tokens: int | None = None) -> float:
    """Peak bytes of the logits and the loss, for `tokens` positions scored at once.

    The standard path (transformers' ForCausalLMLoss): the head writes compute-dtype logits, the
    loss upcasts them to fp32 and cross-entropy keeps the fp32 log-softmax (4 B per logit). In
    backward, the fp32 gradient of the log-softmax output and the fp32 gradient of its input
    exist together with the saved log-softmax: 3 x 4 B per logit at the peak. Chunking (scoring
    `chunk_tokens` positions at a time) bounds the tokens present at once.
    """
    live = tokens if chunk_tokens is None else min(tokens, chunk_tokens)
    return 3.0 * FP32 * vocab * live


def fused_loss_bytes(vocab: int, hidden: int, tokens: int, chunk_tokens: int, *,
                     compute_bytes: int, hidden_bytes: int, head_trainable: bool,
                     head_weight_bytes: int) -> tuple[float, float]:
    """(peak while the loss runs, bytes kept for backward) of strop's fused head + loss.

    strop.train.loss scores `chunk_tokens` positions at a time and computes the gradients in the
    forward pass. In a chunk: the compute-dtype logits and their fp32 copy, then the softmax
    (made in place from the fp32 logits) and its compute-dtype cast: 6 B per logit at once in
    bf16, 4 in fp32 (where both casts are no-ops). Beside the latter, when the head trains, the
    chunk's head-weight gradient before it is added up: a (V, H) product in the compute dtype
    and its fp32 copy. Around the chunks: the gathered hidden states, their fp32 gradient, the
    fp32 head-weight gradient when the head trains, and the head weight cast to the compute
    dtype when it is stored wider. Kept for backward: only the two gradients.
    """
    live = min(tokens, chunk_tokens)
    widen = FP32 if compute_bytes != FP32 else 0  # an fp32 copy, where it is not a no-op
    kept = FP32 * tokens * hidden + (FP32 * vocab * hidden if head_trainable else 0)
    cast = compute_bytes * vocab * hidden if head_weight_bytes != compute_bytes else 0
    chunk_grad_w = (compute_bytes + widen) * vocab * hidden if head_trainable else 0
    peak = float((compute_bytes + widen) * live * vocab + chunk_grad_w) \
        + hidden_bytes * tokens * hidden + kept + cast
    return peak, kept


def attention_mask_bytes(seq_len: int, micro_batch: int, attention: str, masked: bool,
                         compute_bytes: int) -> float:
    """The 4-D mask transformers builds for padded or packed rows: bool (B, 1, T, T) for SDPA,
    an additive mask in the compute dtype for eager; flash attention takes none."""
    if not masked or attention.startswith("flash"):
        return 0.0
    per = 1 if attention in ("sdpa", "flex_attention") else compute_bytes
    return float(per * micro_batch * seq_len * seq_len)
