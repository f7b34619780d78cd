"""The data benchmark runs (strop's side, a few hundred rows): it stays importable and honest."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import data_prep  # noqa: E402


def test_benchmark_rows_and_strop_side(tmp_path):
    rows = data_prep.make_rows(300)
    assert rows == data_prep.make_rows(300)  # deterministic
    assert 0.2 < sum(bool(r["input"]) for r in rows) / 300 < 0.6
    tok = data_prep.train_bench_tokenizer(rows)
    path = tmp_path / "rows.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seconds, info = data_prep.run_strop(path, tok, 512, workers=1)
    assert seconds > 0 and info["rows"] == 300
    assert 0 < info["trained_tokens"] < info["tokens"] and info["packing_efficiency"] > 0.8
