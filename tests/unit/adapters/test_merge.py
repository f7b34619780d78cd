"""merge_adapter: LoRA and QLoRA merges that match the adapter model, verified before writing,
never over an existing directory by accident."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strop.adapters.merge import merge_adapter
from strop.config import load_dict
from strop.config.show import render_resolved
from strop.errors import StropError

DATA = [{"path": "d.jsonl", "type": "alpaca"}]


def make_run(tmp_path, base, tokens=(), config_edits=(), **keys):
    """What `strop train` leaves for a LoRA run: adapter, tokenizer, strop-config.yml."""
    from transformers import AutoTokenizer

    from strop.adapters.lora import apply_lora
    from strop.model.load import load_model

    loaded = load_dict({"base_model": str(base), "datasets": DATA, "learning_rate": 1e-4,
                        "adapter": "lora", "lora_target_linear": True, "bf16": False, **keys})
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(list(tokens))
    model, _ = apply_lora(load_model(loaded.cfg, tok, "cpu", torch.float32), loaded.cfg)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as if trained: B away from its zero init
            torch.nn.init.normal_(param, std=0.05)
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    text = render_resolved(loaded)
    for old, new in config_edits:
        text = text.replace(old, new)
    (run / "strop-config.yml").write_text(text)
    return run, model


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))


def test_lora_merge_with_added_tokens_matches_the_adapter_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A run trained on a GPU (device: cuda, bf16: true) merges on this CPU.
    run, adapter_model = make_run(
        tmp_path, tiny_model_dir("llama"), tokens=["<tool>", "</tool>"],
        lora_modules_to_save=["embed_tokens", "lm_head"],
        config_edits=[("device: auto", "device: cuda"), ("bf16: false", "bf16: true")])
    result = merge_adapter(run, tmp_path / "merged")
    assert result.passed and result.max_abs_diff < 1e-4, result.messages
    assert "max |merged - adapter| logit difference" in result.messages[-2]

    out = tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert len(AutoTokenizer.from_pretrained(out)) == merged.config.vocab_size
    ids = IDS.clone()
    ids[0, -2:] = torch.tensor([merged.config.vocab_size - 2, merged.config.vocab_size - 1])
    assert torch.allclose(logits(merged, ids), logits(adapter_model, ids), atol=1e-4)


def test_qlora_merges_into_the_full_precision_base_not_dequantized_weights(tiny_model_dir,
                                                                            tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama")
    run, qlora = make_run(tmp_path, base, adapter="qlora", load_in_4bit=True,
                          bnb_4bit_compute_dtype="float32")
    result = merge_adapter(run, tmp_path / "merged")
    assert result.passed
    assert any("not into dequantized 4-bit weights" in m for m in result.messages)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    full = AutoModelForCausalLM.from_pretrained(base)
    name = "model.layers.0.self_attn.q_proj"
    lora_a = qlora.get_submodule(f"base_model.model.{name}.lora_A.default").weight
    lora_b = qlora.get_submodule(f"base_model.model.{name}.lora_B.default").weight
    delta = (lora_b @ lora_a) * (16 / 8)
    merged_weight = merged.get_submodule(name).weight
    assert torch.allclose(merged_weight, full.get_submodule(name).weight + delta, atol=1e-6)
    # ...and it is what plain PEFT on the full-precision base computes.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run)
    assert torch.allclose(logits(merged, IDS), logits(reference, IDS), atol=1e-4)


@pytest.mark.parametrize("keys", [{"peft_use_dora": True}, {"peft_use_rslora": True}],
                         ids=["dora", "rslora"])
def test_dora_and_rslora_merges_pass_verification(tiny_model_dir, tmp_path, keys):
    from transformers import AutoModelForCausalLM

    run, adapter_model = make_run(tmp_path, tiny_model_dir("llama"), **keys)
    result = merge_adapter(run, tmp_path / "merged")
    assert result.passed and result.max_abs_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged, IDS), logits(adapter_model, IDS), atol=1e-4)


def test_a_merge_that_fails_verification_is_not_written_unless_forced(tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    import strop.adapters.merge as merge

    run, _ = make_run(tmp_path, tiny_model_dir("llama"))
    real = merge._logits
    calls = []

    def broken_merge(model, ids):  # the second call scores the merged model: corrupt it
        calls.append(1)
        return real(model, ids) + (0.5 if len(calls) % 2 == 0 else 0.0)

    monkeypatch.setattr(merge, "_logits", broken_merge)
    with pytest.raises(StropError, match="differ from the adapter model's by 0.5.*--force"):
        merge_adapter(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    result = merge_adapter(run, tmp_path / "merged", force=True)
    assert not result.passed and (tmp_path / "merged" / "model.safetensors").is_file()
    assert "writing anyway because of --force" in " ".join(result.messages)


def test_output_directory_is_never_overwritten_by_accident(tiny_model_dir, tmp_path):
    run, _ = make_run(tmp_path, tiny_model_dir("llama"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StropError, match="already exists and is not empty.*--overwrite"):
        merge_adapter(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(StropError, match="would overwrite the run"):
        merge_adapter(run, run, overwrite=True)
    merge_adapter(run, out, overwrite=True, dtype="bfloat16")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".merged.merging-*"))  # no staging left behind
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_bare_adapter_directory_merges_with_its_named_or_given_base(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    run, _ = make_run(tmp_path, base)
    (run / "strop-config.yml").unlink()
    named = merge_adapter(run, tmp_path / "a")  # adapter_config.json names the base
    assert named.passed and named.base_model == str(base)
    given = merge_adapter(run, tmp_path / "b", base=str(base))
    assert given.passed
    with pytest.raises(StropError, match="--base: ./no/such/base does not exist"):
        merge_adapter(run, tmp_path / "c", base="./no/such/base")


def test_runs_without_an_adapter_say_what_to_do(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    loaded = load_dict({"base_model": "m", "datasets": DATA, "learning_rate": 1e-5})
    (full / "strop-config.yml").write_text(render_resolved(loaded))
    with pytest.raises(StropError, match="full fine-tuning run"):
        merge_adapter(full, tmp_path / "out")
    lora = tmp_path / "lora"
    (lora / "checkpoint-20").mkdir(parents=True)
    (lora / "checkpoint-20" / "adapter_config.json").write_text("{}")
    with pytest.raises(StropError, match="strop merge .*checkpoint-20"):
        merge_adapter(lora, tmp_path / "out")
    with pytest.raises(StropError, match="no such run directory"):
        merge_adapter(Path(tmp_path / "missing"), tmp_path / "out")
