"""The tiktoken twin of a byte-level BPE tokenizer gives the tokenizer's own ids, or stands down."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import make_tokenizer, tiny_corpus
from strop.data import fast_bpe
from strop.data.encode import Encoder
from strop.data.fast_bpe import fast_bpe_for

MIXED = ["Hello, world!  Two  spaces\tand a tab\n\nnew lines", "it's 3.14159 and 1,000,000",
         "naïve émigré 漢字 🙂", "code: def f(x):\n    return x ** 2", "<|im_start|>user\nhi<|im_end|>",
         "a</s>b and <s> inside", "", " ", "trailing "]


def _reference(tok, texts):
    return [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def test_twin_matches_the_tokenizer_on_mixed_text_and_special_tokens():
    tok = make_tokenizer("bpe", vocab_size=600)
    twin = fast_bpe_for(tok)
    assert twin is not None
    texts = MIXED + tiny_corpus(300, seed=3)
    assert twin.ids(texts) == _reference(tok, texts)
    # Text holding a special token goes to the tokenizer, which keeps the token whole.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in twin.ids(["<|im_start|>user\nhi<|im_end|>"])[0]
    assert twin.active


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_no_twin_for_other_tokenizer_kinds(kind):
    assert fast_bpe_for(make_tokenizer(kind, vocab_size=300)) is None


def test_no_twin_when_merges_are_out_of_id_order():
    spec = json.loads(make_tokenizer("bpe", vocab_size=600).backend_tokenizer.to_str())
    assert fast_bpe._ranks(spec["model"]) is not None
    spec["model"]["merges"] = list(reversed(spec["model"]["merges"]))
    assert fast_bpe._ranks(spec["model"]) is None


def test_no_twin_with_a_normalizer_or_prefix_space():
    assert fast_bpe._split_pattern({"type": "ByteLevel", "add_prefix_space": True,
                                    "use_regex": True}) is None
    assert fast_bpe._split_pattern({"type": "Metaspace"}) is None
    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{L}+|\\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert fast_bpe._split_pattern(split) == "\\p{L}+|\\s+"


def test_a_mismatch_in_the_sample_drops_the_twin_for_good(caplog):
    tok = make_tokenizer("bpe", vocab_size=600)
    twin = fast_bpe_for(tok)

    class Wrong:  # an engine that disagrees on every text
        @staticmethod
        def encode_ordinary(text):
            return [0]

    twin.encoding = Wrong()
    texts = tiny_corpus(100, seed=5)
    with caplog.at_level(logging.WARNING, logger="strop.data"):
        assert twin.ids(texts) == _reference(tok, texts)  # the batch is redone by the tokenizer
    assert not twin.active
    assert "different ids" in caplog.text
    assert twin.ids(texts[:3]) == _reference(tok, texts[:3])


def test_encoder_uses_the_twin_and_gets_the_same_rows():
    tok = make_tokenizer("bpe", vocab_size=600)
    fast, slow = Encoder(tok), Encoder(tok)
    assert fast.twin is not None
    slow.twin = None
    texts = tiny_corpus(200, seed=7)
    assert fast._ids(texts) == slow._ids(texts)
