"""`strop inspect` and `strop merge` as a user runs them: output, files and exit codes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

DATA = [{"path": "d.jsonl", "type": "alpaca"}]


@pytest.mark.parametrize("family,expect", [
    ("llama", ["LlamaForCausalLM", "model.layers.{0-1}.self_attn.q_proj.weight", "q_proj", "64 -> 32"]),
    ("mistral", ["MistralForCausalLM", "model.layers.{0-1}.mlp.down_proj.weight", "128 -> 64"]),
    ("gpt2", ["GPT2LMHeadModel", "transformer.h.{0-1}.attn.c_attn.weight", "Conv1D", "64 -> 192"]),
    ("bert", ["BertForMaskedLM", "bert.encoder.layer.{0-1}.attention.self.query.weight", "query"]),
])
def test_inspect_a_model_directory(cli, tiny_model_dir, family, expect):
    result = cli("inspect", tiny_model_dir(family))
    assert result.code == 0, result.err
    for text in expect + ["parameters", "hidden size  64", "suggested: lora_target_modules: ["]:
        assert text in result.out, text


def test_inspect_a_config_prints_lora_counts_and_json(cli, tiny_model_dir, write_yaml):
    config = write_yaml(yaml.safe_dump({
        "base_model": str(tiny_model_dir("llama")), "datasets": DATA, "learning_rate": 2e-4,
        "adapter": "lora", "lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"]}))
    text = cli("inspect", config)
    assert text.code == 0, text.err
    # q: 8 * (64 + 64), v: 8 * (64 + 32), two layers
    assert "LoRA r=8 alpha=16 from the config wraps 4 modules (q_proj x2, v_proj x2)" in text.out
    assert "trainable parameters: 3,584" in text.out
    data = json.loads(cli("inspect", config, "--json").out)
    assert data["lora"]["trainable_params"] == 3584
    assert data["lora"]["targets"] == {"q_proj": 2, "v_proj": 2}
    assert data["suggested_target_modules"][0] == "q_proj"


def test_inspect_errors_are_one_line(cli, tmp_path):
    result = cli("inspect", tmp_path / "nothing.json")
    assert result.code == 2 and result.err.startswith("error: ") and "Traceback" not in result.err
    assert result.err.count("\n") == 1


def _lora_run(tmp_path, base):
    """A finished LoRA run directory, as `strop train` writes it."""
    from transformers import AutoTokenizer

    from strop.adapters.lora import apply_lora
    from strop.config import load_dict
    from strop.config.show import render_resolved
    from strop.model.load import load_model

    loaded = load_dict({"base_model": str(base), "datasets": DATA, "learning_rate": 2e-4,
                        "adapter": "lora", "lora_target_linear": True, "bf16": False})
    tok = AutoTokenizer.from_pretrained(base)
    model, _ = apply_lora(load_model(loaded.cfg, tok), loaded.cfg)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    (run / "strop-config.yml").write_text(render_resolved(loaded))
    return run


def test_merge_writes_a_verified_model_and_never_overwrites_silently(cli, tiny_model_dir,
                                                                      tmp_path):
    from transformers import AutoModelForCausalLM

    run = _lora_run(tmp_path, tiny_model_dir("llama"))
    out = tmp_path / "merged"
    result = cli("merge", run, "--out", out)
    assert result.code == 0, result.err
    assert "max |merged - adapter| logit difference" in result.out
    assert f"wrote {out}" in result.out
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0

    again = cli("merge", run, "--out", out)
    assert again.code == 2 and "--overwrite" in again.err and again.err.count("\n") == 1
    assert cli("merge", run, "--out", out, "--overwrite").code == 0
    missing_out = cli("merge", run)
    assert missing_out.code == 2 and "--out DIR is required" in missing_out.err
