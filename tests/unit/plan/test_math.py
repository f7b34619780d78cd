"""Transformer math against hand-computed values."""

from __future__ import annotations

import pytest

from strop.recipe import math as tm
from strop.recipe.shape import ModelShape, model_shape

# A Llama-like shape small enough to add up by hand.
SHAPE = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                   vocab=1000, gated_mlp=True, tied_embeddings=False)
# Per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; MLP 3*64*128 = 24576.
N = 2 * (12288 + 24576) + 1000 * 64  # head included: 137728


def test_matmul_params_by_hand():
    assert SHAPE.matmul_params_per_token == N == 137_728


def test_full_training_is_6n_plus_attention():
    seq = 256
    attention = 12 * SHAPE.layers * seq * SHAPE.q_dim  # 12 * 2 * 256 * 64 = 393216
    assert tm.training_flops_per_token(SHAPE, seq) == 6 * N + attention == 1_219_584
    # equal trainable and total counts also mean full training
    assert tm.training_flops_per_token(SHAPE, seq, 500, 500) == 6 * N + attention


def test_lora_has_no_weight_gradients_for_the_frozen_base():
    seq, adapters = 128, 10_000
    attention = 12 * 2 * seq * 64
    got = tm.training_flops_per_token(SHAPE, seq, trainable_params=adapters, total_params=N)
    assert got == 4 * N + 6 * adapters + attention


def test_checkpointing_adds_one_forward():
    seq = 128
    plain = tm.training_flops_per_token(SHAPE, seq)
    again = tm.training_flops_per_token(SHAPE, seq, recompute=True)
    assert again - plain == 2 * N + 4 * 2 * seq * 64


def test_flops_from_a_transformers_config():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1000)
    assert model_shape(config) == SHAPE
    assert tm.training_flops_per_token(config, 256) == tm.training_flops_per_token(SHAPE, 256)


def test_matmul_params_match_the_real_linear_layers():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for family, extra in (("llama", {}), ("mistral", {}), ("qwen3", {"head_dim": 24})):
        config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=500, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert model_shape(config).matmul_params_per_token == linear, family


def test_nf4_bits_and_the_double_quant_saving():
    assert tm.nf4_bits_per_param(False) == 4.5
    assert tm.nf4_bits_per_param(True) == pytest.approx(4.127, abs=1e-3)
    saving = tm.nf4_bits_per_param(False) - tm.nf4_bits_per_param(True)
    assert saving == pytest.approx(0.373, abs=1e-3)
    numel = 64 * 256 * 10  # 2560 blocks of 64, 10 second-level blocks
    plain = tm.nf4_bytes(numel, double_quant=False, linears=0)
    assert plain == numel / 2 + 2560 * 4
    double = tm.nf4_bytes(numel, double_quant=True, linears=0)
    assert double == numel / 2 + 2560 + 10 * 4


def test_optimizer_states_per_optimizer():
    shapes = [(1024, 64), (64,)]  # 65536 + 64 elements
    assert tm.optimizer_state_bytes("adamw_torch_fused", shapes) == 8 * 65600
    # 8-bit: the matrix in 8 bits with one fp32 scale per 256; the vector (< 4096) in fp32
    assert tm.optimizer_state_bytes("adamw_8bit", shapes) == 2 * (65536 + 256 * 4) + 8 * 64
    assert tm.optimizer_state_bytes("sgd", shapes) == 0
    assert tm.optimizer_state_bytes("sgd", shapes, sgd_momentum=0.9) == 4 * 65600
    assert tm.optimizer_state_bytes("adafactor", shapes) == 4 * (1024 + 64) + 4 * 64
    with pytest.raises(ValueError):
        tm.optimizer_state_bytes("nadam", shapes)


def test_logits_buffer_full_and_chunked():
    assert tm.logits_peak_bytes(32000, 4096) == 12 * 32000 * 4096
    assert tm.logits_peak_bytes(32000, 4096, chunk_tokens=1024) == 12 * 32000 * 1024
