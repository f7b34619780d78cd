"""apply_lora: what is wrapped and trained, the variants (DoRA, rsLoRA, PiSSA, fan_in_fan_out),
continuing an adapter, and adapters that plain PEFT loads."""

from __future__ import annotations

import pytest
import torch

from strop.adapters.lora import apply_lora
from strop.config import load_dict
from strop.errors import StropError
from strop.model.load import load_model

DATA = [{"path": "d.jsonl", "type": "alpaca"}]


def lora_cfg(base, **kw):
    keys = dict(base_model=str(base), datasets=DATA, learning_rate=1e-4, adapter="lora",
                bf16=False)
    if "lora_target_modules" not in kw:
        keys["lora_target_linear"] = True
    return load_dict({**keys, **kw}).cfg


def loaded(tiny_model_dir, family="llama", dtype=torch.float32, **kw):
    from transformers import AutoTokenizer

    base = tiny_model_dir(family)
    cfg = lora_cfg(base, **kw)
    tok = AutoTokenizer.from_pretrained(base)
    model = load_model(cfg, tok, "cpu", dtype)
    return apply_lora(model, cfg)


def batch(seed=0):
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train_steps(model, steps=8, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def expected_lora_params(peft_model, r):
    """r * (in + out) for every wrapped layer, plus every module in modules_to_save."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            total += r * (module.in_features + module.out_features)
    for name in peft_model.peft_config["default"].modules_to_save or []:
        copies = [m for n, m in peft_model.named_modules()
                  if n.endswith(f"{name}.modules_to_save.default")]
        total += sum(p.numel() for m in copies for p in m.parameters())
    return total


@pytest.mark.parametrize("keys", [
    {},
    {"lora_target_modules": ["q_proj", "v_proj"], "lora_r": 4},
    {"lora_target_modules": r"model\.layers\.1\.mlp\..*_proj", "lora_r": 16},
    {"lora_modules_to_save": ["lm_head", "norm"]},
    {"peft_layers_to_transform": [0]},
], ids=["all-linear", "names", "regex", "modules-to-save", "layer-0"])
def test_trainable_params_are_r_times_in_plus_out_plus_modules_to_save(tiny_model_dir, keys):
    model, report = loaded(tiny_model_dir, **keys)
    r = keys.get("lora_r", 8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable_params == expected_lora_params(model, r)
    assert report.base_params == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n
        and "modules_to_save" not in n)


def test_report_counts_wrapped_modules_per_name(tiny_model_dir):
    _, report = loaded(tiny_model_dir, lora_target_modules=["q_proj", "v_proj", "down_proj"])
    assert report.wrapped == {"down_proj": 2, "q_proj": 2, "v_proj": 2}
    text = report.render()
    assert "wrapped 6 modules: down_proj x2, q_proj x2, v_proj x2" in text
    assert f"{report.trainable_params:,}" in text and "LoRA r=8 alpha=16 (scale 2)" in text
    # q: 8*(64+64), v: 8*(64+32) (2 kv heads of 16), down: 8*(128+64), in 2 layers
    assert report.trainable_params == 2 * 8 * (128 + 96 + 192)


def test_target_that_matches_nothing_lists_the_linear_layers(tiny_model_dir):
    with pytest.raises(StropError) as err:
        loaded(tiny_model_dir, lora_target_modules=["query_key_value"])
    message = str(err.value)
    assert "query_key_value" in message and "q_proj" in message and "gate_proj" in message


def test_gpt2_conv1d_uses_fan_in_fan_out_trains_and_merges_exactly(tiny_model_dir):
    model, report = loaded(tiny_model_dir, "gpt2")
    assert model.peft_config["default"].fan_in_fan_out
    assert set(report.wrapped) == {"c_attn", "c_proj", "c_fc"}
    # Conv1D stores (in, out): c_attn is 64 -> 192, so r * (64 + 192) per layer.
    assert report.trainable_params == expected_lora_params(model, 8)
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    model.eval()
    ids = batch(1)["input_ids"]
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, adapter_logits, atol=1e-4)


@pytest.mark.parametrize("keys,method,scale", [
    ({"peft_use_dora": True}, "DoRA", 2.0),
    ({"peft_use_rslora": True, "lora_r": 16, "lora_alpha": 16}, "rsLoRA", 4.0),
])
def test_dora_and_rslora_train(tiny_model_dir, keys, method, scale):
    model, report = loaded(tiny_model_dir, **keys)
    assert report.method == method and report.scaling == pytest.approx(scale)
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.05, losses


def test_pissa_init_keeps_the_model_output(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama")
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    model, _ = loaded(tiny_model_dir, peft_init_lora_weights="pissa")
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert lora_b.abs().sum() > 0  # principal components, not zeros
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-4)


def test_frozen_bf16_base_trains_fp32_adapter_weights(tiny_model_dir):
    model, _ = loaded(tiny_model_dir, dtype=torch.bfloat16, lora_modules_to_save=["lm_head"])
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_qlora_and_8bit_bases_are_reported_and_train(tiny_model_dir):
    model, report = loaded(tiny_model_dir, adapter="qlora", load_in_4bit=True,
                           bnb_4bit_compute_dtype="float32")
    assert report.quantized == "4-bit nf4" and "on a 4-bit nf4 base" in report.render()
    assert report.trainable_params == expected_lora_params(model, 8)
    losses = train_steps(model, steps=4)
    assert losses[-1] < losses[0]
    _, eight = loaded(tiny_model_dir, load_in_8bit=True, lora_target_modules=["q_proj"])
    assert eight.quantized == "8-bit" and "on an 8-bit base" in eight.render()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_adapter_loads_in_plain_peft_with_the_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = loaded(tiny_model_dir, lora_modules_to_save=["lm_head"], lora_dropout=0.1)
    train_steps(model, steps=3)
    model.save_pretrained(tmp_path / "adapter")
    ids = batch(2)["input_ids"]
    ours = _logits(model, ids)

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")), tmp_path / "adapter")
    assert torch.allclose(_logits(plain, ids), ours, atol=1e-5)
    # ...and strop's own loading of it (lora_model_dir) gives the same logits and trains on.
    again, report = loaded(tiny_model_dir, lora_model_dir=str(tmp_path / "adapter"),
                           lora_modules_to_save=["lm_head"])
    assert report.continued_from and torch.allclose(_logits(again, ids), ours, atol=1e-5)
    assert report.trainable_params == expected_lora_params(again, 8)


def test_continuing_an_adapter_that_does_not_exist_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(StropError, match="lora_model_dir: .* does not exist"):
        loaded(tiny_model_dir, lora_model_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StropError, match="has no adapter_config.json"):
        loaded(tiny_model_dir, lora_model_dir=str(tmp_path / "empty"))
