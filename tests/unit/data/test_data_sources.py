"""Reading files and hub ids, and every kind of bad row, with file:line and field."""

from __future__ import annotations

import json

import pytest
from helpers_data import bpe, config, write_jsonl

from strop.data import prepare_data, sources
from strop.errors import StropError

GOOD = {"instruction": "Name a river.", "output": "The north river."}


@pytest.fixture
def tok():
    return bpe()


def _prepare(tok, tmp_path, datasets, **keys):
    cfg = config(datasets, dataset_prepared_path=str(tmp_path / "cache"), **keys)
    return prepare_data(cfg, tok)


def test_every_kind_of_bad_row_is_listed_with_file_line_and_field(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_ROW_BYTES", 400)
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD).encode(),                                        # 1 ok
             b'{"instruction": "x", "output": "y"',                             # 2 not JSON
             b'{"instruction": "caf\xe9", "output": "y"}',                     # 3 invalid UTF-8
             b'["a", "b"]',                                                     # 4 not an object
             json.dumps({"output": "y"}).encode(),                              # 5 missing field
             json.dumps({"instruction": "x", "output": 7}).encode(),            # 6 wrong type
             json.dumps({"instruction": "x" * 500, "output": "y"}).encode(),    # 7 too large
             json.dumps(GOOD).encode()]                                         # 8 ok
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(StropError) as err:
        _prepare(tok, tmp_path, [{"path": str(path), "type": "alpaca"}])
    problems = err.value.problems
    assert problems[0] == "6 bad rows in the data:"
    text = "\n".join(problems)
    assert f"{path}:2: not valid JSON" in text
    assert f"{path}:3: invalid UTF-8 (byte 0xe9 at column 21)" in text
    assert f"{path}:4: expected a JSON object" in text
    assert f"{path}:5: instruction: missing field (the row has: output)" in text
    assert f"{path}:6: output: expected text, got int 7" in text
    assert f"{path}:7: line is 0.0 MB, over the 0 MB limit" in text
    assert problems[-1].endswith("set skip_invalid_rows: true to train on the valid rows")


def test_chat_bad_rows(tok, tmp_path):
    rows = [{"messages": []},
            {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(StropError) as err:
        _prepare(tok, tmp_path, [{"path": str(path), "type": "chat_template"}])
    assert f"{path}:1: messages: empty conversation" in err.value.problems
    assert any(p.startswith(f"{path}:2: messages[0].role: unknown role 'wizard'")
               for p in err.value.problems)


def test_only_the_first_20_bad_rows_are_listed(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"nope": i} for i in range(25)] + [GOOD])
    with pytest.raises(StropError) as err:
        _prepare(tok, tmp_path, [{"path": str(path), "type": "alpaca"}])
    problems = err.value.problems
    assert len(problems) == 1 + 20 + 1
    assert problems[-1].startswith("... and 5 more bad rows;")


def test_skip_invalid_rows_trains_on_the_rest_and_says_why(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl",
                       [GOOD, {"output": "y"}, {"instruction": "x", "output": 1}, GOOD, {"output": "z"}])
    data = _prepare(tok, tmp_path, [{"path": str(path), "type": "alpaca"}], skip_invalid_rows=True)
    assert data.stats.documents == 2 and len(data.train) == 2
    assert data.stats.invalid == 3
    assert data.stats.invalid_reasons == {"instruction: missing field": 2, "output: expected text": 1}


def test_empty_after_filtering_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}])
    with pytest.raises(StropError, match="no training rows are left after filtering"):
        _prepare(tok, tmp_path, [{"path": str(path), "type": "alpaca"}], skip_invalid_rows=True)


def test_csv_parquet_json_array_text_folder_and_glob(tok, tmp_path):
    import datasets

    table = datasets.Dataset.from_list([GOOD, {"instruction": "Say hi.", "output": "Hi."}])
    table.to_csv(tmp_path / "a.csv", index=False)
    table.to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([GOOD]))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("The first line.\n\nThe second line.\n")
    (tmp_path / "corpus" / "two.txt").write_text("Another file.\n")
    got = {}
    for name, entry in {"csv": {"path": str(tmp_path / "a.csv"), "type": "alpaca"},
                        "parquet": {"path": str(tmp_path / "b.parquet"), "type": "alpaca"},
                        "json array": {"path": str(tmp_path / "c.json"), "type": "alpaca"},
                        "folder": {"path": str(tmp_path / "corpus"), "type": "completion"},
                        "glob": {"path": str(tmp_path / "corpus" / "*.txt"), "type": "completion"},
                        "data_files": {"path": str(tmp_path / "corpus"), "data_files": "two.txt",
                                       "type": "completion"}}.items():
        rows = list(sources.iter_rows(config([entry]).datasets[0], tmp_path / "hf"))
        got[name] = [(where.split("/")[-1], row) for where, row in rows]
    assert got["csv"] == [("a.csv row 1", GOOD), ("a.csv row 2", {"instruction": "Say hi.", "output": "Hi."})]
    assert got["parquet"][1][1]["output"] == "Hi."
    assert got["json array"] == [("c.json row 1", GOOD)]
    assert got["folder"] == [("one.txt:1", {"text": "The first line."}),
                             ("one.txt:3", {"text": "The second line."}),
                             ("two.txt:1", {"text": "Another file."})]
    assert got["glob"] == got["folder"]
    assert got["data_files"] == [("two.txt:1", {"text": "Another file."})]


def test_shards(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": str(i)} for i in range(10)])
    entry = {"path": str(path), "type": "completion", "shards": 3}
    seen = []
    for index in range(3):
        ds = config([{**entry, "shards_idx": index}]).datasets[0]
        seen.append([row["text"] for _, row in sources.iter_rows(ds)])
    assert seen == [["0", "1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"]]


def test_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = config([{"path": "someone/no-such-dataset", "type": "alpaca"}]).datasets[0]
    with pytest.raises(StropError) as err:
        list(sources.iter_rows(ds))
    message = str(err.value)
    assert "\n" not in message
    assert "dataset 'someone/no-such-dataset' could not be loaded from the Hugging Face hub" in message
    assert "point path at a local copy" in message


def test_missing_local_file_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = config([{"path": "data/train.jsonl", "type": "alpaca"}]).datasets[0]
    with pytest.raises(StropError, match="datasets path data/train.jsonl: no such file or folder"):
        list(sources.iter_rows(ds))
