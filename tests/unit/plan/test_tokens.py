"""Tokens per epoch from local files."""

from __future__ import annotations

import json

from strop.config.load import load_dict
from strop.plan.tokens import DEFAULT_CHARS_PER_TOKEN, TEMPLATE_TOKENS_PER_ROW, estimate_tokens


def _cfg(path, **keys):
    return load_dict({"datasets": [{"path": str(path), "type": "alpaca"}],
                      "learning_rate": 1e-4, "base_model": "meta-llama/Llama-3.2-1B",
                      **keys}).cfg


def _write_rows(path, rows: int, chars: int):
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"instruction": "x" * (chars - 1), "output": "y"}) + "\n")


def test_packed_rows_fill_sequence_len_blocks(tmp_path):
    data = tmp_path / "d.jsonl"
    _write_rows(data, rows=100, chars=400)  # 400 chars + a space = 401 -> ~100 tokens + template
    est = estimate_tokens(_cfg(data, sample_packing=True, sequence_len=512))
    per_row = 401 / DEFAULT_CHARS_PER_TOKEN + TEMPLATE_TOKENS_PER_ROW
    assert est.rows == 100
    assert abs(est.text_tokens - 100 * per_row) < 1e-6
    assert est.tokens_per_epoch == 512 * -(-100 * per_row // 512)


def test_held_out_rows_and_padding_to_sequence_len(tmp_path):
    data = tmp_path / "d.jsonl"
    _write_rows(data, rows=200, chars=40)
    est = estimate_tokens(_cfg(data, val_set_size=0.25, pad_to_sequence_len=True,
                               sequence_len=256))
    assert est.rows == 150
    assert est.tokens_per_epoch == 150 * 256


def test_a_hub_dataset_is_reported_missing():
    est = estimate_tokens(_cfg("someone/remote-dataset"))
    assert est.tokens_per_epoch is None and est.missing == ("someone/remote-dataset",)
