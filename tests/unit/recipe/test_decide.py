"""The trainer's decisions (strop.recipe): one function for the loop and for strop plan."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from strop.config import load_dict
from strop.device import DeviceCaps
from strop.errors import StropError
from strop.precision import decide_precision, run_device
from strop.recipe.decide import decide_setup

DATA = [{"path": "d.jsonl", "type": "alpaca"}]
LAPTOP = DeviceCaps(cuda=False, cuda_bf16=False, cpu_bf16=False, cpu_name="old cpu")
BF16_CPU = DeviceCaps(cuda=False, cuda_bf16=False, cpu_bf16=True, cpu_name="new cpu")
H100 = DeviceCaps(cuda=True, cuda_bf16=True, cpu_bf16=False, cpu_name="host")
LLAMA = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def cfg_of(**kw):
    return load_dict({"base_model": "m", "datasets": DATA, "learning_rate": 1e-4, **kw}).cfg


@pytest.mark.parametrize("bf16, caps, device, compute, noted", [
    (True, BF16_CPU, "cpu", torch.bfloat16, False),
    (True, LAPTOP, "cpu", torch.float32, True),  # emulated bf16: hundreds of times slower
    ("auto", LAPTOP, "cpu", torch.float32, False),
    ("auto", BF16_CPU, "cpu", torch.bfloat16, False),
    (False, H100, "cuda", torch.float32, False),
    ("auto", H100, "cuda", torch.bfloat16, False),
])
def test_precision_follows_the_config_and_what_the_device_can(bf16, caps, device, compute, noted):
    precision = decide_precision(cfg_of(bf16=bf16), caps, device)
    assert precision.compute == compute and not precision.scaler
    assert (precision.note is not None) == noted
    if noted:
        assert "training in fp32 instead" in precision.note and "old cpu" in precision.note


def test_fp16_runs_on_a_gpu_with_a_scaler_and_falls_back_on_a_cpu():
    assert decide_precision(cfg_of(fp16=True, bf16=False), H100, "cuda").scaler
    cpu = decide_precision(cfg_of(fp16=True, bf16="auto"), BF16_CPU, "cpu")
    assert cpu.compute == torch.bfloat16 and "fp16 needs a GPU" in cpu.note


def test_device_cuda_without_a_gpu_is_refused_when_training_not_when_validating():
    cfg = cfg_of(device="cuda")
    with pytest.raises(StropError, match="no CUDA GPU is visible"):
        run_device(cfg, LAPTOP)
    assert run_device(cfg, H100) == "cuda"
    assert run_device(cfg_of(), LAPTOP) == "cpu"


def test_attention_and_lean_activations_as_the_loop_runs_them():
    flash = cfg_of(attn_implementation="flash_attention_2", sequence_len=128)
    on_gpu = decide_setup(flash, H100, LLAMA, "cuda")
    assert on_gpu.attention == "flash_attention_2" and on_gpu.mask_free and not on_gpu.varlen
    assert decide_setup(flash, H100, LLAMA, "cuda", flash_installed=False).attention == "sdpa"
    on_cpu = decide_setup(flash, LAPTOP, LLAMA, "cpu")
    assert on_cpu.attention == "sdpa" and on_cpu.varlen  # strop's mask-free attention
    plain = cfg_of(sequence_len=128)
    assert decide_setup(plain, LAPTOP, LLAMA, "cpu").lean_norms
    # FSDP2 swaps parameters on the modules that held them: no lean modules under it
    assert not decide_setup(plain, LAPTOP, LLAMA, "cpu", strategy="fsdp").lean
    assert not decide_setup(cfg_of(gradient_checkpointing=True), LAPTOP, LLAMA, "cpu").lean
    assert decide_setup(plain, LAPTOP, LLAMA, "cpu").logits_chunk == 1024
