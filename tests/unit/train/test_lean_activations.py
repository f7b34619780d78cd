"""Lean RMSNorm and SwiGLU: same outputs and gradients as transformers' modules, fewer saved
bytes, and the model as loaded once training is over."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from strop.recipe.decide import LEAN_MLPS as MLPS
from strop.recipe.decide import LEAN_NORMS as NORMS
from strop.train.lean_activations import LeanRMSNorm, LeanSwiGLU, lean_activations

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "granite"]


def tiny(model_type: str, dtype=torch.float32):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SIZES)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # norms start at exactly 1; make their gradients non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.train()


def loss_and_grads(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    loss = (hidden.float() ** 2).mean()
    loss.backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("autocast", [False, True])
def test_same_outputs_and_gradients(model_type, autocast):
    model = tiny(model_type)
    ids = torch.randint(0, 100, (2, 24))
    want_hidden, want = loss_and_grads(model, ids, autocast)
    with lean_activations(model) as swapped:
        got_hidden, got = loss_and_grads(model, ids, autocast)
    assert swapped > 0
    assert torch.equal(got_hidden, want_hidden)  # the forward is the same ops in the same order
    assert got.keys() == want.keys()
    # fp32: equal to float rounding. bf16: the norm's gradient is summed in another order, and
    # a last-bit difference can flip a bf16 rounding downstream; bf16's own step is 2**-8.
    limit = 1e-2 if autocast else 1e-5
    for name in want:
        error = float((got[name] - want[name]).norm() / want[name].norm())
        assert error < limit, f"{name}: relative error {error:.1e}"


def test_every_named_class_exists_and_is_swapped():
    swapped_types = set()
    for model_type in ARCHS:
        model = tiny(model_type)
        originals = {type(m).__name__ for m in model.modules()}
        with lean_activations(model):
            swapped_types |= originals - {type(m).__name__ for m in model.modules()}
    swapped_types.discard("SiLUActivation")  # the lean SwiGLU calls silu itself
    assert swapped_types == NORMS | (MLPS - {"Phi3MLP"})  # Phi3's MLP fuses gate and up


def test_state_dict_keys_unchanged_and_originals_restored():
    model = tiny("llama")
    keys = list(model.state_dict())
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    with lean_activations(model):
        assert isinstance(model.model.layers[0].input_layernorm, LeanRMSNorm)
        assert isinstance(model.model.layers[0].mlp, LeanSwiGLU)
        assert list(model.state_dict()) == keys
        assert model.model.layers[0].input_layernorm.weight is norm.weight
    assert model.model.layers[0].input_layernorm is norm and model.model.layers[0].mlp is mlp


def test_a_lora_model_under_bf16_saves_fewer_bytes():
    from peft import LoraConfig, get_peft_model

    r = 4
    model = get_peft_model(tiny("llama", dtype=torch.bfloat16),
                           LoraConfig(r=r, target_modules="all-linear"))
    batch, seq = 3, 40  # 3 and 120 tokens: no weight has either as its first dimension
    ids = torch.randint(0, 100, (batch, seq))

    def saved_activation_bytes():
        seen, total = set(), [0]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if t.shape[0] in (batch, batch * seq) and ptr not in seen:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model.base_model.model.model(input_ids=ids, use_cache=False)
        return total[0]

    eager = saved_activation_bytes()
    with lean_activations(model.base_model.model):
        lean = saved_activation_bytes()
    # Per token and layer: the two norms keep their bf16 input, not an fp32 copy (2 x 2H fewer
    # bytes); silu's output and down_proj's input (2I each) are not kept. The lean SwiGLU's own
    # hooks hide down_proj's saved tensors from this outer hook, so LoRA A's (r-wide) output
    # inside down_proj also drops out of the count.
    H, I = SIZES["hidden_size"], SIZES["intermediate_size"]  # noqa: E741
    expected = batch * seq * SIZES["num_hidden_layers"] * (2 * 2 * H + 2 * I + 2 * I + 2 * r)
    assert eager - lean == expected


def test_down_proj_input_is_not_kept_alive():
    import weakref

    model = tiny("llama", dtype=torch.bfloat16)
    kept = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: kept.append(weakref.ref(args[0])))
    ids = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model.model(input_ids=ids, use_cache=False).last_hidden_state
        assert kept[-1]() is not None  # a trained down_proj keeps its input for backward
        with lean_activations(model):
            lean = model.model(input_ids=ids, use_cache=False).last_hidden_state
            assert kept[-1]() is None  # ... which the lean SwiGLU rebuilds instead
    (lean.float().sum()).backward()  # and backward still runs
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    del eager
