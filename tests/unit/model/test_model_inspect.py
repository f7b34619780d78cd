"""strop inspect's content: from config.json alone, on the meta device, with exact LoRA counts."""

from __future__ import annotations

import json
import resource
import shutil
import time

import pytest

from strop.commands.inspect import inspect_target, render
from strop.errors import StropError

DATA = [{"path": "d.jsonl", "type": "alpaca"}]


def config_only(tiny_model_dir, family, tmp_path):
    """A directory holding nothing but the model's config.json."""
    target = tmp_path / f"{family}-config"
    target.mkdir()
    shutil.copy(tiny_model_dir(family) / "config.json", target / "config.json")
    return target


@pytest.mark.parametrize("family,architecture,targets", [
    ("llama", "LlamaForCausalLM",
     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("mistral", "MistralForCausalLM",
     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("gpt2", "GPT2LMHeadModel", ["c_attn", "c_proj", "c_fc"]),
    ("bert", "BertForMaskedLM", ["query", "key", "value", "dense"]),
])
def test_config_json_alone_gives_the_real_models_counts(tiny_model_dir, tmp_path, family,
                                                        architecture, targets):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    result = inspect_target(config_only(tiny_model_dir, family, tmp_path))
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    real = auto.from_pretrained(tiny_model_dir(family))
    assert result.architecture == architecture
    assert result.total_params == sum(p.numel() for p in real.parameters())
    assert sum(result.params_by_module_type.values()) == result.total_params
    assert result.suggested_target_modules == targets
    assert result.hidden_size == 64 and result.num_layers == 2
    keys = {g.name for g in result.tensors}
    assert sum(g.count for g in result.tensors) == len(real.state_dict())
    assert any("{0-1}" in k for k in keys)  # per-layer keys collapse into one line
    text = render(result)
    assert architecture in text and "suggested: lora_target_modules: [" in text


def test_gpt2_conv1d_shapes_read_as_in_to_out_and_tied_head_is_marked(tiny_model_dir, tmp_path):
    result = inspect_target(config_only(tiny_model_dir, "gpt2", tmp_path))
    c_attn = next(g for g in result.linear_layers if g.suffix == "c_attn")
    assert (c_attn.in_features, c_attn.out_features, c_attn.module_type) == (64, 192, "Conv1D")
    head = next(g for g in result.tensors if g.name == "lm_head.weight")
    assert head.tied_to == "transformer.wte.weight" and head.params == 0
    assert "output head, not a target" in render(result)


def test_every_layer_lists_each_key(tiny_model_dir, tmp_path):
    result = inspect_target(config_only(tiny_model_dir, "llama", tmp_path), every_layer=True)
    names = [g.name for g in result.tensors]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.self_attn.q_proj.weight" in names


@pytest.mark.parametrize("keys", [
    {"lora_target_linear": True},
    {"lora_target_modules": ["q_proj", "v_proj"], "lora_r": 4,
     "lora_modules_to_save": ["lm_head"]},
    {"lora_target_linear": True, "peft_use_dora": True, "lora_r": 16},
])
def test_yaml_config_counts_exactly_what_training_would(tiny_model_dir, write_yaml, keys):
    import yaml
    from transformers import AutoTokenizer

    from strop.adapters.lora import apply_lora
    from strop.config import load_config
    from strop.model.load import load_model

    base = tiny_model_dir("llama")
    path = write_yaml(yaml.safe_dump({"base_model": str(base), "datasets": DATA,
                                      "learning_rate": 1e-4, "adapter": "lora", **keys}))
    result = inspect_target(path)
    cfg = load_config(path).cfg
    _, report = apply_lora(load_model(cfg, AutoTokenizer.from_pretrained(base)), cfg)
    assert result.lora.trainable_params == report.trainable_params
    assert result.lora.targets == report.wrapped
    assert result.lora.ratio_to_full == pytest.approx(report.trainable_ratio)
    assert f"{report.trainable_params:,}" in render(result)


def test_a_7b_config_inspects_without_memory_in_seconds(tmp_path, write_yaml):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = inspect_target(tmp_path / "config.json")
    assert result.total_params == 6_738_415_616  # Llama-2-7B
    assert result.dtype == "bfloat16"
    assert time.perf_counter() - started < 30
    q_proj = next(g for g in result.linear_layers if g.suffix == "q_proj")
    assert q_proj.count == 32 and q_proj.in_features == q_proj.out_features == 4096
    assert "r=16 on every linear layer" in result.notes[0]
    # r * (in + out) summed over the 7 projections of 32 layers, at r=16:
    per_layer = 4 * (4096 + 4096) + 3 * (4096 + 11008)
    assert f"{16 * 32 * per_layer:,}" in result.notes[0]
    # Weights were never materialised: 6.7B parameters would be 13 GB in bf16.
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib
    assert grown_kib < 1_000_000


def test_unreadable_targets_are_one_line(tmp_path):
    with pytest.raises(StropError, match="no such file"):
        inspect_target(tmp_path / "missing.json")
    with pytest.raises(StropError, match="offline"):
        inspect_target("strop-test/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StropError, match="no config.json"):
        inspect_target(tmp_path / "empty")
