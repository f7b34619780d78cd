"""The activation formula against what autograd really saves, tensor by tensor.

A saved-tensors hook records every tensor the forward keeps for backward; the bytes attributed
to one decoder layer (parameters and autocast's weight copies excluded, since the memory math
counts those separately) must equal strop.recipe.math.layer_activation_bytes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from strop.recipe import math as tm
from strop.recipe.shape import model_shape

B, T = 3, 50  # B*T = 150 differs from every weight dimension below
SIZES = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=500, max_position_embeddings=128)


def _model(mode: str, attention: str, tmp_path):
    """The model as strop trains it: its k-bit preparation (norms fp32, embeddings and head
    left in bf16) and PEFT without its input casts (strop.train.loop's speedups)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from strop.model.quantize import prepare_for_kbit_training

    config = AutoConfig.for_model("llama", **SIZES)
    config._attn_implementation = attention
    torch.manual_seed(0)
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                   bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                     attn_implementation=attention)
        model = prepare_for_kbit_training(model)
    else:
        dtype = torch.bfloat16 if mode == "lora" else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if mode != "full":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model.train(), config


def _saved_bytes_of_layer(model, layer_index: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    where = ["outside"]
    for i, layer in enumerate(base.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: where.__setitem__(0, i))
    base.model.norm.register_forward_pre_hook(lambda mod, args: where.__setitem__(0, "head"))
    seen: dict[int, tuple] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and tuple(tensor.shape) not in weight_shapes:
            seen[key] = (where[0], storage.nbytes())
        return tensor

    from peft.helpers import disable_input_dtype_casting

    ids = torch.randint(0, SIZES["vocab_size"], (B, T))
    casting = disable_input_dtype_casting(model) if hasattr(model, "peft_config") \
        else contextlib.nullcontext()
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16), casting):
        model(input_ids=ids, labels=ids)
    return sum(n for w, n in seen.values() if w == layer_index)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lean", [False, True])
def test_layer_activations_match_what_autograd_saves(mode, attention, lean, tmp_path):
    from strop.train.lean_activations import lean_activations

    model, config = _model(mode, attention, tmp_path)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with lean_activations(base) if lean else contextlib.nullcontext():
        traced = _saved_bytes_of_layer(model, layer_index=1)
    shape = model_shape(config)
    d, q, kv, inter = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    # all-linear LoRA wraps q, k, v, o, gate, up and down: (in_features, rank, reads) each
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = [] if mode == "full" else [(n, 8, tm.lora_reads(name)) for n, name in
                                      zip([d, d, d, q, d, d, inter], names, strict=True)]
    predicted = tm.layer_activation_bytes(
        shape, T, attention=attention, mode=mode, compute_bytes=2,
        residual_bytes=2 if mode == "lora" else 4, projection_bytes=4 if mode == "qlora" else 2,
        lora_inputs=lora, norms_trainable=mode == "full", lean_norms=lean,
        lean_swiglu=lean) * B * T
    if lean and mode != "full":
        # The lean SwiGLU's hooks are the innermost inside down_proj, so this outer hook does
        # not see what down_proj keeps there: LoRA A's output (rank wide), and under QLoRA the
        # bf16 copy of its fp32 input that autocast makes for LoRA A (not a view: kept).
        hidden = 2 * 8 + (2 * inter if mode == "qlora" else 0)
        predicted -= hidden * B * T
    assert predicted == traced, (predicted, traced, kv)
