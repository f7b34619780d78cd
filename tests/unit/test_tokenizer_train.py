"""Tokenizers trained on a corpus behave like hub tokenizers: they save, reload and round-trip."""

from __future__ import annotations

import pytest

from conftest import CHAT_SPECIALS, make_tokenizer, tiny_corpus
from strop.config.schema import PretrainTokenizer
from strop.errors import StropError
from strop.model.tokenizer_train import train_tokenizer


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_causal_tokenizer_round_trips_and_prepends_bos(kind, tmp_path):
    from transformers import AutoTokenizer

    tok = make_tokenizer(kind)
    text = "What is the capital of the north? Héllo 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True).strip() == text or kind == "unigram"
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    for special in CHAT_SPECIALS:  # chat markers are single tokens, never split
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids


def test_byte_level_bpe_never_needs_unk():
    tok = make_tokenizer("bpe")
    ids = tok("ẞ 漢字 ∑", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "ẞ 漢字 ∑"


def test_bpe_learns_merges_up_to_the_vocab_size():
    tok = make_tokenizer("bpe", vocab_size=400)
    assert 300 < len(tok) <= 400
    # Frequent words of the corpus (after a space, as they occur) become single tokens.
    assert len(tok(" question", add_special_tokens=False)["input_ids"]) == 1


def test_wordpiece_is_bert_style():
    tok = make_tokenizer("wordpiece")
    ids = tok("quick river")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.mask_token == "[MASK]"


def test_max_rows_limits_the_corpus():
    small = train_tokenizer(tiny_corpus(), PretrainTokenizer(vocab_size=2000, max_rows=5))
    big = train_tokenizer(tiny_corpus(), PretrainTokenizer(vocab_size=2000))
    assert len(small) < len(big)


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(StropError, match="corpus is empty"):
        train_tokenizer(["", ""], PretrainTokenizer(type="wordpiece", vocab_size=100))
