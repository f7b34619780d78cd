"""`strop preprocess` and `strop data check` as a user runs them."""

from __future__ import annotations

import json

import pytest

WORDS = "alpha beta gamma delta river stone cloud lamp orange violet seven eleven".split()


def _sentence(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i}."


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def crafted(tmp_path):
    """15 lines: 10 distinct rows, 2 exact duplicates, 1 near duplicate, 1 empty response,
    2 long responses and 1 long prompt (over --sequence-len 256), and 1 bad line."""
    rows = [{"instruction": f"Question {i}: {_sentence(i, 4)}?", "output": _sentence(i)} for i in range(10)]
    long_words = " ".join(WORDS[k % 12] + str(k) for k in range(60))
    rows[2] = {"instruction": "Describe the long river.", "output": long_words}
    rows[3] = {"instruction": "Describe the other river.", "output": long_words[::-1] + " again " * 40}
    rows[4] = {"instruction": "Why? " * 120, "output": "Because."}
    near = dict(rows[2], output=long_words.replace("river5", "stone5"))
    lines = [json.dumps(r) for r in rows + [rows[0], rows[1], near, {"instruction": "Say nothing.", "output": ""}]]
    lines.insert(5, '{"instruction": "broken"')
    path = tmp_path / "crafted.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_check_figures_on_a_crafted_file(cli, crafted, tiny_model_dir, tmp_path):
    png = tmp_path / "hist.png"
    result = cli("data", "check", crafted, "--type", "alpaca", "--tokenizer", tiny_model_dir("llama"),
                 "--sequence-len", "256", "--json", "--png", png)
    # The crafted file holds an invalid row: the figures come, then exit 2 (CI can gate on it).
    assert result.code == 2 and "1 invalid row(s)" in result.err, result.err
    f = json.loads(result.out)
    assert (f["rows"], f["valid_rows"], f["invalid_rows"]) == (15, 14, 1)
    assert f["bad_rows"] == [f"{crafted}:6: not valid JSON (Expecting ',' delimiter at column 25)"]
    assert f["exact_duplicate_rows"] == 2 and f["exact_duplicate_pct"] == round(200 / 14, 2)
    assert f["near_duplicate_rows"] == 1
    assert f["truncated_rows"] == 4 and f["truncated_pct"] == round(400 / 14, 2)
    assert f["nothing_trained_rows"] == 1          # the long prompt leaves nothing to train
    assert f["eos_not_trained_rows"] == 3          # the long responses (and the near copy) lose EOS
    assert f["empty_responses"] == 1
    assert f["tokens"] > f["tokens_per_epoch"] and 0 < f["packing_efficiency"] <= 1
    assert 0 < f["distinct_1"] <= 1 and 0 < f["distinct_2"] <= 1
    # The histogram is a real PNG image.
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100


def test_data_check_text_report_and_samples(cli, crafted, tiny_model_dir, tmp_path):
    result = cli("data", "check", crafted, "--type", "alpaca", "--tokenizer", tiny_model_dir("llama"),
                 "--show", "2", "--png", tmp_path / "h.png", "--no-strict")
    assert result.code == 0, result.err
    assert "exact duplicates  2 rows" in result.out
    assert "prompt (tokens per row)" in result.out and "█" in result.out
    assert "sample 2" in result.out and "### Response:" in result.out


@pytest.mark.parametrize("rows, message", [
    ([], "no usable rows"),
    ([{"instruction": f"Q{i}?", "output": ""} for i in range(4)], "every response is empty"),
])
def test_data_check_fails_an_empty_dataset_or_empty_responses(rows, message, cli, tiny_model_dir,
                                                              tmp_path):
    data = _write(tmp_path / "d.jsonl", rows)
    result = cli("data", "check", data, "--type", "alpaca", "--tokenizer",
                 tiny_model_dir("llama"), "--png", tmp_path / "h.png")
    assert result.code == 2 and message in result.err, result.err + result.out


def test_training_on_all_empty_responses_is_an_error(cli, write_yaml, tiny_model_dir, tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"instruction": f"Q{i}?", "output": ""}
                                        for i in range(8)])
    config = write_yaml(f"""
base_model: {tiny_model_dir("llama")}
datasets:
  - path: {data}
    type: alpaca
learning_rate: 1e-4
output_dir: {tmp_path / "run"}
""")
    result = cli("train", config)
    assert result.code == 2 and "every response in the training data is empty" in result.err


def test_data_check_on_a_file_needs_type_and_tokenizer(cli, crafted):
    result = cli("data", "check", crafted)
    assert result.code == 2
    assert "give its format and a tokenizer" in result.err


def test_preprocess_writes_then_reuses_the_cache(cli, write_yaml, tiny_model_dir, tmp_path):
    data = _write(tmp_path / "train.jsonl",
                  [{"instruction": f"Q{i}?", "output": _sentence(i)} for i in range(20)])
    config = write_yaml(f"""
base_model: {tiny_model_dir("llama")}
datasets:
  - path: {data}
    type: alpaca
val_set_size: 0.1
sequence_len: 256
sample_packing: true
dataset_prepared_path: {tmp_path / "prepared"}
learning_rate: 1e-4
""")
    first = cli("preprocess", config)
    assert first.code == 0, first.err
    assert "prepared data written" in first.out and "from 18 documents" in first.out
    assert "eval    " in first.out and "packing " in first.out
    second = cli("preprocess", config)
    assert "prepared data reused" in second.out
    bad = _write(tmp_path / "train.jsonl", [{"instruction": "x"}])
    third = cli("preprocess", config)
    assert third.code == 2 and f"{bad}:1: output: missing field" in third.err
