"""load_tokenizer: from a directory, special tokens, pad fallback, chat template, and training
one on the corpus (reused while the corpus and settings are unchanged)."""

from __future__ import annotations

import pytest
from helpers_data import config, write_jsonl

from strop.errors import StropError
from strop.model.tokenizer import TRAINED_KEY_FILE, load_tokenizer


def test_loads_base_model_tokenizer_with_tokens_and_specials(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    cfg = config(base_model=path, tokens=["<tool>"],
                 special_tokens={"additional_special_tokens": ["<|think|>"]})
    tok = load_tokenizer(cfg)
    assert len(tok("<tool>", add_special_tokens=False)["input_ids"]) == 1
    assert "<|think|>" in tok.all_special_tokens
    assert tok.pad_token == "<pad>"


def test_pad_falls_back_to_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(config(base_model=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_tokenizer_config_wins_and_chat_template_is_set(tiny_model_dir):
    cfg = config(base_model="some/elsewhere", tokenizer_config=str(tiny_model_dir("llama")),
                 chat_template="llama3")
    tok = load_tokenizer(cfg)
    assert "<|start_header_id|>" in tok.chat_template


def test_unknown_class_and_missing_directory_are_clear(tmp_path):
    with pytest.raises(StropError, match="tokenizer_type 'NoSuchTokenizer' is not a tokenizer class"):
        load_tokenizer(config(base_model=str(tmp_path), tokenizer_type="NoSuchTokenizer"))
    with pytest.raises(StropError, match="cannot load the tokenizer"):
        load_tokenizer(config(base_model=str(tmp_path / "nothing-here")))


def test_pretrain_tokenizer_is_trained_saved_and_reused(tmp_path):
    from conftest import tiny_corpus

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in tiny_corpus(200)])
    keys = dict(base_model=None, model_config={"model_type": "llama", "hidden_size": 32},
                pretrain_tokenizer={"vocab_size": 300, "save_path": str(tmp_path / "tok")},
                output_dir=str(tmp_path / "out"))
    cfg = config([{"path": str(corpus), "type": "completion"}], **keys)
    tok = load_tokenizer(cfg)
    assert 250 < len(tok) <= 300 and tok.pad_token == "<pad>"
    key_file = tmp_path / "tok" / TRAINED_KEY_FILE
    stamp = key_file.stat().st_mtime_ns
    again = load_tokenizer(cfg)  # unchanged corpus and settings: read back, not retrained
    assert key_file.stat().st_mtime_ns == stamp
    assert again("The river.")["input_ids"] == tok("The river.")["input_ids"]
    write_jsonl(corpus, [{"text": t} for t in tiny_corpus(200, seed=3)])
    load_tokenizer(cfg)  # the corpus changed: trained again
    assert key_file.stat().st_mtime_ns != stamp
