"""`strop demo` end to end, shrunk: every stage runs, the table, merge and report come out, and
the demo says plainly that two training steps do not meet its claims."""

from __future__ import annotations

import pytest
from rich.console import Console

from strop.demo.run import STAGES, run_demo
from strop.demo.world import WorldSpec
from strop.errors import StropError

TINY = WorldSpec(people=10, towns=3, statements_per_fact=1)


@pytest.mark.slow
def test_a_tiny_demo_runs_every_stage_and_checks_its_claims(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(width=240, record=True)
    code = run_demo(console, TINY, ["--max_steps", "2"])
    text = console.export_text()
    out = tmp_path / "demo-out"
    for stage in STAGES:
        assert (out / stage / "summary.json").exists(), stage
        assert stage in text
    assert (out / "lora-merged" / "model.safetensors").exists()
    assert (out / "report" / "report.html").exists()
    assert "exact match on held-out questions" in text and "plan" in text
    # Two steps teach nothing: the claims fail and the demo says so with a non-zero status.
    assert code == 1 and "FAIL" in text
    assert "pass  the merged LoRA model gives the adapter's logits" in text

    # A second demo replaces the first one's files, and says so.
    console = Console(width=240, record=True)
    run_demo(console, TINY, ["--max_steps", "1"])
    assert "replacing the previous demo's files" in console.export_text()


def test_the_demo_never_replaces_a_demo_out_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "mine.txt").write_text("a user's file")
    with pytest.raises(StropError, match="not written by strop demo"):
        run_demo(Console(record=True), TINY)
    assert (tmp_path / "demo-out" / "mine.txt").read_text() == "a user's file"
