"""Seconds per training step on this CPU, from timing the step's own pieces at their own shapes.

A square matmul's rate says little about training a small model on a CPU: the model's matmuls
are thin (hidden 256 against 1024 tokens), and norms, activations, softmax and the loss are
memory-bound work a FLOP count leaves out. So instead of FLOPs / (peak x an assumed MFU), strop
times what one micro-batch does, piece by piece, in the compute dtype:

- every distinct linear shape (q, k, v, o, the MLP, the head): the forward matmul, the input
  gradient, and the weight gradient where the weight trains; each counted once per layer;
- LoRA's two thin matmuls per adapted linear, forward and backward;
- QLoRA's dequantization of each 4-bit weight (bitsandbytes), once in the forward and once in
  the backward pass, and the casts around each 4-bit matmul: QLoRA keeps the norms in fp32, so
  the residual stream is fp32 and bitsandbytes casts every input to the compute dtype and every
  output back (and the norms and activations run in fp32);
- attention (SDPA, causal) forward and backward at (micro_batch, heads, seq_len, head_dim);
- per layer, two RMS norms and the gated activation, forward and backward; the loss's
  softmax over the vocabulary;
- gradient checkpointing repeats each layer's forward (weighted by RECOMPUTE_WORK).

- autocast's bf16 copy of fp32 weights (full training), and the optimizer step's share.

A probe that would take long (big models) runs on fewer tokens and is scaled up (linearly, or
quadratically for attention). What the probes leave out (RoPE, residual adds, the embedding,
dropout, data movement between ops, autograd and Python dispatch, and cold caches where a probe
runs hot) is one factor, UNPROBED_WORK, fitted on benchmarks/plan_accuracy.py's matrix on a
2-core AVX512-BF16 machine. It was 1.4 (steps took 1.2-1.75x the probed pieces); strop's own
step has since got leaner, and two runs of the matrix on 2026-11-29 measured 1.0-1.6x (about
1.2 typical, the runs themselves 10% apart). 1.3 keeps every case of both within 25%.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from strop.plan.memory import Setup
from strop.plan.params import ParamCounts
from strop.recipe.shape import ModelShape

PROBE_FLOPS = 2e9      # largest matmul probed at full size; bigger ones run on fewer tokens
PROBE_ELEMENTS = 16_000_000  # largest tensor a probe allocates; bigger ones are probed in part
MIN_PROBE_TOKENS = 256
BIG_STEP_FLOPS = 1e13  # a micro-batch step over this (about 30 s here) gets a single probe pass
UNPROBED_WORK = 1.3    # measured step time / sum of the probed pieces (see the docstring)
# A checkpointed layer's recompute costs more than its forward's probes suggest: it runs inside
# the backward pass (caches cold from the gradients' work) with checkpointing's saved-tensor
# hooks on every op. Fitted on the same matrix: the 9 checkpointed cases against the 9 without
# (least squares gave 1.26; without it every checkpointed case came out too fast).
RECOMPUTE_WORK = 1.4


@dataclass
class StepTiming:
    seconds: float                      # one micro-batch: forward, backward (and recompute)
    parts: dict[str, float] = field(default_factory=dict)  # the probed pieces, in seconds

    def tokens_per_second(self, tokens: int) -> float:
        return tokens / self.seconds if self.seconds else 0.0


def _time(fn, min_repeats: int = 3, budget: float = 0.05) -> float:
    """Best of at least `min_repeats` runs, more while under `budget` seconds (up to 20): short
    probes are noisy, and the best run is the one least disturbed."""
    fn()  # the first call picks and prepares kernels
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_repeats or (spent < budget and runs < 20):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def _linear_seconds(torch, tokens: int, fan_in: int, fan_out: int, dtype, weight_grad: bool,
                    gen) -> tuple[float, float]:
    """(forward, backward) seconds of x @ W^T for `tokens` rows, scaled from a smaller probe
    (fewer rows, and for a big weight fewer output features: time is linear in both)."""
    full_out = fan_out
    fan_out = max(1, min(fan_out, PROBE_ELEMENTS // fan_in,
                         int(PROBE_FLOPS / (2 * MIN_PROBE_TOKENS * fan_in))))
    probe = min(tokens, max(MIN_PROBE_TOKENS, int(PROBE_FLOPS / (2 * fan_in * fan_out))))
    x = torch.randn(probe, fan_in, dtype=dtype, generator=gen)
    w = torch.randn(fan_out, fan_in, dtype=dtype, generator=gen)
    g = torch.randn(probe, fan_out, dtype=dtype, generator=gen)
    forward = _time(lambda: torch.nn.functional.linear(x, w))
    backward = _time(lambda: g @ w)
    if weight_grad:
        backward += _time(lambda: g.t() @ x)
    scale = tokens / probe * full_out / fan_out
    return forward * scale, backward * scale


def _attention_seconds(torch, shape: ModelShape, setup: Setup, dtype, gen) -> tuple[float, float]:
    seq = setup.seq_len
    probe = seq
    while probe > 128 and 4.0 * setup.micro_batch * shape.q_dim * probe * probe > PROBE_FLOPS:
        probe //= 2

    def make(heads):
        return torch.randn(setup.micro_batch, heads, probe, shape.head_dim, dtype=dtype,
                           generator=gen, requires_grad=True)

    q, k, v = make(shape.heads), make(shape.kv_heads), make(shape.kv_heads)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = shape.heads != shape.kv_heads
    forward = _time(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=gqa))
    out = sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    grad = torch.randn_like(out)
    both = _time(lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=True, enable_gqa=gqa),
                                             (q, k, v), grad))
    scale = (seq / probe) ** 2
    return forward * scale, max(both - forward, 0.0) * scale


def _elementwise_seconds(torch, shape: ModelShape, tokens: int, dtype, gen) -> tuple[float, float]:
    """One layer's two RMS norms and gated activation, forward and backward (as HF runs them:
    the norm in fp32, the activation in the compute dtype)."""
    probe = max(1, min(tokens, 2048, PROBE_ELEMENTS // shape.intermediate))
    h = torch.randn(probe, shape.hidden, dtype=dtype, generator=gen, requires_grad=True)
    gate = torch.randn(probe, shape.intermediate, dtype=dtype, generator=gen, requires_grad=True)
    up = torch.randn(probe, shape.intermediate, dtype=dtype, generator=gen, requires_grad=True)
    weight = torch.ones(shape.hidden, dtype=dtype)

    def layer():
        x = h.float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * weight
        act = torch.nn.functional.silu(gate) * up if shape.gated_mlp else \
            torch.nn.functional.gelu(gate)
        return normed, act

    forward = 2 * _time(layer)  # two norms per layer; the activation counted twice is the residual adds

    def step():
        normed, act = layer()
        torch.autograd.backward([normed, act], [torch.ones_like(normed), torch.ones_like(act)])

    both = 2 * _time(step)
    scale = tokens / probe
    return forward * scale, max(both - forward, 0.0) * scale


def _loss_seconds(torch, shape: ModelShape, tokens: int, gen) -> float:
    """Softmax cross-entropy over the vocabulary in fp32, forward and backward."""
    probe = max(1, min(tokens, 1024, PROBE_ELEMENTS // shape.vocab))
    logits = torch.randn(probe, shape.vocab, generator=gen, requires_grad=True)
    target = torch.randint(0, shape.vocab, (probe,), generator=gen)
    return _time(lambda: torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, target), logits)) * tokens / probe


def _casts_seconds(torch, tokens: int, linears: Counter, dtype) -> float:
    """QLoRA's casts around every 4-bit matmul, forward and backward: the fp32 input to the
    compute dtype and the output back, then the same for the gradients."""
    elements = sum(n * tokens * (fan_in + fan_out) for (fan_in, fan_out), n in linears.items())
    return 2 * _cast_seconds(torch, elements, dtype)


def _dequant_seconds(torch, fan_in: int, fan_out: int, dtype, double_quant: bool) -> float:
    import bitsandbytes.functional as bnbf

    rows = max(1, min(fan_out, PROBE_ELEMENTS // 64 // fan_in))  # quantizing is slow: keep it small
    w = torch.randn(rows, fan_in, dtype=dtype)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)
    return _time(lambda: bnbf.dequantize_4bit(packed, state)) * fan_out / rows


def _optimizer_seconds(torch, numel: int) -> float:
    """One AdamW step (fused where torch has it) over `numel` fp32 parameters."""
    probe = max(1, min(numel, PROBE_ELEMENTS))
    p = torch.zeros(probe, requires_grad=True)
    p.grad = torch.ones(probe)
    try:
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW([p], lr=1e-4)
    return _time(opt.step) * numel / probe


def _cast_seconds(torch, numel: int, dtype) -> float:
    """Copying `numel` fp32 values into `dtype`: autocast's copy of the fp32 weights for each
    forward, QLoRA's casts of activations (the cast back to fp32 costs the same here)."""
    probe = max(1, min(numel, PROBE_ELEMENTS))
    w = torch.randn(probe)
    return _time(lambda: w.to(dtype)) * numel / probe


def _linears(shape: ModelShape) -> Counter:
    """(fan_in, fan_out) -> how many the model has, the head included."""
    per_layer = Counter()
    per_layer[(shape.hidden, shape.q_dim)] += 1
    per_layer[(shape.hidden, shape.kv_dim)] += 2
    per_layer[(shape.q_dim, shape.hidden)] += 1
    experts = shape.experts_per_token
    per_layer[(shape.hidden, shape.intermediate)] += (2 if shape.gated_mlp else 1) * experts
    per_layer[(shape.intermediate, shape.hidden)] += experts
    counts = Counter({key: n * shape.layers for key, n in per_layer.items()})
    counts[(shape.hidden, shape.vocab)] += 1
    return counts


def cpu_step_seconds(shape: ModelShape, params: ParamCounts, setup: Setup,
                     accumulation: int = 1, passes: int | None = None) -> StepTiming:
    """Predicted seconds of one micro-batch's forward and backward on this CPU: every piece is
    timed in `passes` passes and the fastest kept, so a burst of other work does not count.
    By default three passes for a model one would train on a CPU (a second or two each), one
    for bigger ones (their probes are the slow ones, and their estimate is hours either way)."""
    if passes is None:
        passes = 3 if 6.0 * shape.matmul_params_per_token * setup.tokens < BIG_STEP_FLOPS else 1
    runs = [_probe_parts(shape, params, setup, accumulation) for _ in range(max(1, passes))]
    parts = {name: min(run[name] for run in runs) for name in runs[0]}
    return StepTiming(UNPROBED_WORK * sum(parts.values()), parts)


def _probe_parts(shape: ModelShape, params: ParamCounts, setup: Setup,
                 accumulation: int) -> dict[str, float]:
    import torch

    dtype = torch.bfloat16 if setup.compute_bytes == 2 else torch.float32
    gen = torch.Generator().manual_seed(0)
    tokens = setup.tokens
    full = setup.mode == "full"
    parts: Counter = Counter()
    linears = _linears(shape)
    head = (shape.hidden, shape.vocab)
    head_forward = 0.0  # not recomputed under checkpointing: the head sits outside the layers
    with torch.no_grad():
        for (fan_in, fan_out), count in linears.items():
            forward, backward = _linear_seconds(torch, tokens, fan_in, fan_out, dtype, full, gen)
            parts["linear forward"] += count * forward
            parts["linear backward"] += count * backward
            if (fan_in, fan_out) == head:
                head_forward = forward
            elif setup.mode == "qlora":
                parts["dequantize"] += 2 * count * _dequant_seconds(torch, fan_in, fan_out, dtype,
                                                                    setup.double_quant)
        for module, count in Counter((m.in_features, m.out_features, m.rank)
                                     for m in params.lora_modules).items():
            fan_in, fan_out, rank = module
            a_fwd, a_bwd = _linear_seconds(torch, tokens, fan_in, rank, dtype, True, gen)
            b_fwd, b_bwd = _linear_seconds(torch, tokens, rank, fan_out, dtype, True, gen)
            parts["lora forward"] += count * (a_fwd + b_fwd)
            parts["lora backward"] += count * (a_bwd + b_bwd)
    attn_fwd, attn_bwd = _attention_seconds(torch, shape, setup, dtype, gen)
    parts["attention forward"] = shape.layers * attn_fwd
    parts["attention backward"] = shape.layers * attn_bwd
    # QLoRA's fp32 norms make the residual stream, and so the elementwise work, fp32.
    elem_dtype = torch.float32 if setup.mode == "qlora" else dtype
    elem_fwd, elem_bwd = _elementwise_seconds(torch, shape, tokens, elem_dtype, gen)
    parts["norms and activations forward"] = shape.layers * elem_fwd
    parts["norms and activations backward"] = shape.layers * elem_bwd
    parts["loss"] = _loss_seconds(torch, shape, tokens, gen)
    if setup.mode == "qlora" and dtype != torch.float32:
        quantized = Counter({key: n for key, n in linears.items() if key != head})
        parts["4-bit casts"] = _casts_seconds(torch, tokens, quantized, dtype)
    if setup.gradient_checkpointing:  # every layer's forward runs again in the backward pass
        forward = (sum(v for k, v in parts.items() if k.endswith("forward")) - head_forward
                   + parts["dequantize"] / 2 + parts["4-bit casts"] / 2)
        parts["recompute"] = RECOMPUTE_WORK * forward
    if full and dtype != torch.float32:  # fp32 master weights, cast for each forward
        linear = sum(i * o * n for (i, o), n in linears.items())
        parts["weight casts"] = (2 if setup.gradient_checkpointing else 1) * \
            _cast_seconds(torch, linear, dtype)
    # The optimizer steps once per accumulation window; per micro-batch it is this share.
    parts["optimizer step"] = _optimizer_seconds(torch, params.trainable) / max(1, accumulation)
    return dict(parts)
