"""prepare_data: length rules, splits, pretraining blocks, and the cache."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_data import IGNORE, bpe, config, write_jsonl

from strop.data import prepare_data
from strop.errors import StropError


@pytest.fixture
def tok():
    return bpe()


def _alpaca(n, long_every=0):
    rows = []
    for i in range(n):
        output = "The river is north. " * (40 if long_every and i % long_every == 0 else 1)
        rows.append({"instruction": f"Question {i}?", "output": output.strip()})
    return rows


def _cfg(tmp_path, datasets, **keys):
    keys.setdefault("dataset_prepared_path", str(tmp_path / "cache"))
    return config(datasets, **keys)


def test_unpacked_rows_and_stats(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", _alpaca(10))
    data = prepare_data(_cfg(tmp_path, [{"path": str(path), "type": "alpaca"}]), tok)
    assert len(data.train) == 10 and data.eval is None
    row = data.train[0]
    assert set(row) == {"input_ids", "labels"} and row["input_ids"][-1] == tok.eos_token_id
    s = data.stats
    assert s.rows == s.documents == 10
    assert s.tokens == sum(len(r["input_ids"]) for r in data.train)
    assert s.trained_tokens == sum(sum(x != IGNORE for x in r["labels"]) for r in data.train)
    assert s.packing_efficiency is None


def test_truncate_drop_and_raise_long_rows(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", _alpaca(9, long_every=3))  # rows 0, 3, 6 are long
    entry = [{"path": str(path), "type": "alpaca"}]
    cut = prepare_data(_cfg(tmp_path, entry, sequence_len=128), tok, use_cache=False)
    assert cut.stats.truncated == 3 and len(cut.train) == 9
    assert max(len(r["input_ids"]) for r in cut.train) == 128
    dropped = prepare_data(_cfg(tmp_path, entry, sequence_len=128, drop_long_sequences=True), tok,
                           use_cache=False)
    assert dropped.stats.dropped_long == 3 and len(dropped.train) == 6
    with pytest.raises(StropError, match=r"a.jsonl:1: the row has \d+ tokens, more than sequence_len 128"):
        prepare_data(_cfg(tmp_path, entry, sequence_len=128, excess_length_strategy="raise"), tok,
                     use_cache=False)


def test_prompt_longer_than_sequence_len_leaves_nothing_to_train(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Why? " * 200, "output": "Yes."},
                                               {"instruction": "Why?", "output": "Yes."}])
    data = prepare_data(_cfg(tmp_path, [{"path": str(path), "type": "alpaca"}], sequence_len=160),
                        tok, use_cache=False)
    assert data.stats.dropped_untrained == 1 and len(data.train) == 1


def test_min_sample_len(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hi."}, {"text": "The quick river " * 5}])
    data = prepare_data(_cfg(tmp_path, [{"path": str(path), "type": "completion"}],
                             min_sample_len=10, sample_packing=True), tok, use_cache=False)
    assert data.stats.dropped_short == 1


def test_val_split_fraction_and_count_are_deterministic(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", _alpaca(40))
    entry = [{"path": str(path), "type": "alpaca"}]
    a = prepare_data(_cfg(tmp_path, entry, val_set_size=0.1), tok, use_cache=False)
    b = prepare_data(_cfg(tmp_path, entry, val_set_size=0.1), tok, use_cache=False)
    assert len(a.eval) == 4 and len(a.train) == 36 and a.stats.eval_rows == 4
    assert [r["input_ids"] for r in a.eval] == [r["input_ids"] for r in b.eval]
    counted = prepare_data(_cfg(tmp_path, entry, val_set_size=5), tok, use_cache=False)
    assert len(counted.eval) == 5
    other_seed = prepare_data(_cfg(tmp_path, entry, val_set_size=0.1, seed=1), tok, use_cache=False)
    assert [r["input_ids"] for r in other_seed.eval] != [r["input_ids"] for r in a.eval]
    train = {tuple(r["input_ids"]) for r in a.train}
    assert not train & {tuple(r["input_ids"]) for r in a.eval}


def test_test_datasets_are_the_eval_set(tok, tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", _alpaca(6))
    held = write_jsonl(tmp_path / "b.jsonl", _alpaca(3))
    cfg = _cfg(tmp_path, [{"path": str(train), "type": "alpaca"}],
               test_datasets=[{"path": str(held), "type": "alpaca"}])
    data = prepare_data(cfg, tok, use_cache=False)
    assert len(data.train) == 6 and len(data.eval) == 3


def test_packing_through_prepare(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", _alpaca(30))
    data = prepare_data(_cfg(tmp_path, [{"path": str(path), "type": "alpaca"}], sequence_len=256,
                             sample_packing=True, val_set_size=0.2), tok, use_cache=False)
    assert all("position_ids" in r and len(r["input_ids"]) <= 256 for r in data.train)
    assert data.stats.documents == 24
    assert sum(r["position_ids"].count(0) for r in data.train) == 24
    assert 0.5 < data.stats.packing_efficiency <= 1.0
    assert "position_ids" in data.eval[0]  # eval_sample_packing follows sample_packing


def test_pretraining_text_in_blocks_every_token_trained(tok, tmp_path):
    docs = [f"Document {i} is about the river." for i in range(20)]
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n")
    cfg = _cfg(tmp_path, [{"path": str(tmp_path / "corpus.txt"), "type": "completion"}],
               sequence_len=32, shuffle_merged_datasets=False)
    data = prepare_data(cfg, tok, use_cache=False)
    lengths = [len(r["input_ids"]) for r in data.train]
    assert all(n == 32 for n in lengths[:-1]) and 0 < lengths[-1] <= 32
    assert all(r["labels"] == r["input_ids"] for r in data.train)
    stream = np.concatenate([r["input_ids"] for r in data.train]).tolist()
    assert stream.count(tok.eos_token_id) == 20  # one separator per document
    expected = []
    for doc in docs:
        expected += tok(doc)["input_ids"] + [tok.eos_token_id]
    assert stream == expected
    shuffled = prepare_data(_cfg(tmp_path, cfg.model_dump()["datasets"], sequence_len=32), tok,
                            use_cache=False)  # documents shuffled before they are laid end to end
    assert sorted(np.concatenate([r["input_ids"] for r in shuffled.train]).tolist()) == sorted(stream)
    # Streaming reads the same rows lazily and gives the same blocks.
    streamed = _cfg(tmp_path, [{"path": str(tmp_path / "corpus.txt"), "type": "pretrain",
                                "streaming": True}], sequence_len=32, shuffle_merged_datasets=False)
    again = prepare_data(streamed, tok, use_cache=False)
    assert [r["input_ids"] for r in again.train] == [r["input_ids"] for r in data.train]


def test_mixed_pretraining_text_and_sft_rows(tok, tmp_path):
    (tmp_path / "corpus.txt").write_text("One river.\nTwo rivers.\n")
    sft = write_jsonl(tmp_path / "a.jsonl", _alpaca(3))
    cfg = _cfg(tmp_path, [{"path": str(tmp_path / "corpus.txt"), "type": "completion"},
                          {"path": str(sft), "type": "alpaca"}], sequence_len=512)
    data = prepare_data(cfg, tok, use_cache=False)
    assert data.stats.documents == 5 and len(data.train) == 4  # one block + three rows


# ----------------------------------------------------------------------------------- cache


def test_cache_hits_and_misses(tok, tmp_path):
    import copy

    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A."}]}
        for i in range(5)])
    entry = [{"path": str(path), "type": "chat_template"}]
    cfg = _cfg(tmp_path, entry)
    first = prepare_data(cfg, tok)
    assert not first.cached and (first.path / "stats.json").is_file()
    second = prepare_data(cfg, tok)
    assert second.cached and second.fingerprint == first.fingerprint
    assert [r["input_ids"] for r in second.train] == [r["input_ids"] for r in first.train]
    assert second.stats == first.stats

    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["rivers"])
    assert not prepare_data(cfg, other_tok).cached                       # tokenizer changed
    assert not prepare_data(_cfg(tmp_path, entry, chat_template="llama3"), tok).cached  # template
    templated = copy.deepcopy(tok)
    templated.chat_template = tok.chat_template + "{# changed #}"
    assert not prepare_data(cfg, templated).cached                       # tokenizer's own template
    assert not prepare_data(_cfg(tmp_path, entry, sequence_len=64), tok).cached  # a key that matters
    assert prepare_data(_cfg(tmp_path, entry, learning_rate=3e-4), tok).cached   # one that does not
    write_jsonl(path, [{"messages": [{"role": "user", "content": "New?"},
                                     {"role": "assistant", "content": "Yes."}]}])
    changed = prepare_data(cfg, tok)
    assert not changed.cached and len(changed.train) == 1                # the data changed
