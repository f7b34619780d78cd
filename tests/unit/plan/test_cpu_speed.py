"""strop plan's CPU time: the step's pieces timed at the model's own shapes."""

from __future__ import annotations

import pytest

from strop.device import detect
from strop.plan import cpu_speed
from strop.plan.cpu_speed import cpu_step_seconds
from strop.plan.memory import Setup
from strop.plan.params import LoraModule, ParamCounts
from strop.recipe.shape import ModelShape

# What strop plan times on this CPU: bf16 where it has native bf16, else fp32 (emulated bf16
# matmuls are hundreds of times slower, and strop trains in fp32 there).
BF16 = detect().cpu_bf16
CPU = {"device": "cpu", "compute_bytes": 2 if BF16 else 4}


def shape(hidden: int = 64, layers: int = 2, vocab: int = 512) -> ModelShape:
    return ModelShape(hidden=hidden, layers=layers, heads=4, kv_heads=2, head_dim=hidden // 4,
                      intermediate=2 * hidden, vocab=vocab, gated_mlp=True, tied_embeddings=False)


def params(s: ModelShape, lora_rank: int = 0) -> ParamCounts:
    total = s.matmul_params_per_token + s.vocab * s.hidden
    modules = tuple(LoraModule(f"layers.{i}.q_proj", s.hidden, s.q_dim, lora_rank)
                    for i in range(s.layers)) if lora_rank else ()
    trainable = sum(m.rank * (m.in_features + m.out_features) for m in modules) or total
    return ParamCounts(total=total, trainable=trainable, adapter=trainable if modules else 0,
                       modules_to_save=0, quantized=0, linear_weights=0,
                       linear_weights_trainable=0, head=0, embedding=0, norms_and_biases=0,
                       largest_trainable=0, lora_modules=modules)


def test_full_training_times_every_piece_and_is_positive():
    s = shape()
    timing = cpu_step_seconds(s, params(s), Setup(mode="full", micro_batch=2, seq_len=64, **CPU))
    assert timing.seconds > 0
    for part in ("linear forward", "linear backward", "attention forward", "attention backward",
                 "norms and activations forward", "loss", "optimizer step"):
        assert timing.parts[part] > 0, part
    # fp32 master weights are cast for a bf16 forward; in fp32 nothing is cast
    assert (timing.parts.get("weight casts", 0) > 0) == BF16
    assert "recompute" not in timing.parts
    assert timing.seconds == pytest.approx(cpu_speed.UNPROBED_WORK * sum(timing.parts.values()))
    assert timing.tokens_per_second(128) == pytest.approx(128 / timing.seconds)


def test_checkpointing_adds_a_recompute_and_lora_adds_its_matmuls():
    s = shape()
    plain = Setup(mode="lora", micro_batch=2, seq_len=64, **CPU)
    lora = cpu_step_seconds(s, params(s, lora_rank=8), plain)
    assert lora.parts["lora forward"] > 0 and "weight casts" not in lora.parts
    gc = cpu_step_seconds(s, params(s, lora_rank=8),
                          Setup(mode="lora", micro_batch=2, seq_len=64, **CPU,
                                gradient_checkpointing=True))
    assert gc.parts["recompute"] > 0


def test_qlora_times_the_dequantization():
    pytest.importorskip("bitsandbytes")
    s = shape()
    timing = cpu_step_seconds(s, params(s, lora_rank=8),
                              Setup(mode="qlora", micro_batch=1, seq_len=64, **CPU))
    assert timing.parts["dequantize"] > 0
    # bf16 compute around an fp32 residual stream: every 4-bit matmul's input and output is cast
    assert (timing.parts.get("4-bit casts", 0) > 0) == BF16
    gc = cpu_step_seconds(s, params(s, lora_rank=8),
                          Setup(mode="qlora", micro_batch=1, seq_len=64, **CPU,
                                gradient_checkpointing=True))
    # the recompute repeats the forward's dequantization and casts, weighted like the rest of it
    assert gc.parts["recompute"] >= cpu_speed.RECOMPUTE_WORK * (
        gc.parts["dequantize"] / 2 + gc.parts.get("4-bit casts", 0) / 2)


def test_a_bigger_model_is_slower_and_big_weights_are_probed_in_part():
    setup = Setup(mode="lora", micro_batch=1, seq_len=256, **CPU)
    small, big = shape(64), shape(512, layers=4, vocab=8000)
    assert cpu_step_seconds(big, params(big), setup).seconds > \
        cpu_step_seconds(small, params(small), setup).seconds
    # An 8B-sized layer is probed in part (a few MB per probe) and scaled up, not allocated.
    llama8b = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                         intermediate=14336, vocab=128_256, gated_mlp=True, tied_embeddings=False)
    timing = cpu_step_seconds(llama8b, params(llama8b), Setup(mode="lora", micro_batch=1,
                                                            seq_len=2048, **CPU))
    assert timing.seconds > 100 * cpu_step_seconds(big, params(big), setup).seconds
