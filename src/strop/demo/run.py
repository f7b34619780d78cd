"""`strop demo`: the whole story on a laptop CPU, each claim shown with a measured figure.

A synthetic world (strop.demo.world) → `strop plan` for each stage → pretraining a tiny Llama
from scratch, BPE tokenizer included → fine-tuning it on questions three ways (full, LoRA,
QLoRA) → exact match on held-out questions for the pretrained model and the three fine-tunes →
the LoRA adapter merged and verified → one table and a report with plots.

The stages are the YAML files in examples/demo/, run exactly as a user would run them
(`strop train examples/demo/<stage>.yml`), each in its own process so its peak memory is its
own. Everything is written under demo-out/ in the working directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strop.config import load_config
from strop.demo.world import WorldSpec, write_demo_data
from strop.errors import StropError
from strop.plan.report import count_text, size_text

OUT = Path("demo-out")
MARKER = ".strop-demo"  # says demo-out/ is the demo's own, so a new demo may replace it
STAGES = ("pretrain", "full", "lora", "qlora")
FINE_TUNES = ("full", "lora", "qlora")
# The claims the demo checks: each fine-tune answers clearly more held-out questions exactly than
# the pretrained model (by 50 points), LoRA keeps 95% of full fine-tuning's exact match, QLoRA
# 95% of LoRA's.
CLEARLY_ABOVE = 0.5
KEEPS = 0.95


def stage_configs() -> Path:
    """examples/demo/ of this checkout: the demo runs the files users read and change."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "examples" / "demo"
        if candidate.is_dir():
            return candidate
    raise StropError("strop demo runs from a strop checkout: examples/demo/ was not found next "
                     "to the package; clone the repository and run `make demo` there")


@dataclass
class StageResult:
    run_dir: Path
    summary: dict[str, Any]   # the run's summary.json
    trainable: int
    total_params: int
    planned_bytes: float      # strop plan's training memory on this CPU


def _claim_output_dir(out: Path, console) -> None:
    """demo-out/ is replaced only when an earlier demo made it; anything else is the user's."""
    if previous_demo(out):
        console.print(f"[dim]replacing the previous demo's files in {out}/[/dim]")
        shutil.rmtree(out)
    mark_as_demos(out)


def previous_demo(out: Path) -> bool:
    """True when an earlier demo wrote `out` (its marker is there), False when it is absent or
    empty; anything else is the user's, and stops the demo in one line."""
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / MARKER).exists():
        raise StropError(f"{out}/ exists and was not written by strop demo; move it away or run "
                         "the demo from another directory")
    return True


def mark_as_demos(out: Path) -> None:
    """Create demo-out/ with the marker that lets the next demo replace it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by strop demo; the next demo replaces this directory\n")


def _plan(cfg, console) -> tuple[int, int, float]:
    """`strop plan` for a stage on this CPU: (parameters, trainable, predicted peak bytes)."""
    from strop.plan.report import build_plan

    plan = build_plan(cfg, gpu="cpu")
    row = plan["devices"][0]
    params = plan["params"]
    hours = row["hours"]
    when = f", about {hours * 3600:.0f} s at {row['tokens_per_second']:,.0f} tokens/s" \
        if hours else ""
    console.print(f"[bold]plan[/bold] {params['total']:,} parameters, "
                  f"{params['trainable']:,} trainable; training needs about "
                  f"{row['total_bytes'] / 2**20:,.0f} MiB on top of Python{when}")
    return params["total"], params["trainable"], row["total_bytes"]


def _train(config: Path, overrides: Sequence[str]) -> None:
    """`strop train` in its own process, so its peak memory is its own."""
    proc = subprocess.run([sys.executable, "-m", "strop", "train", str(config), *overrides],
                          check=False)
    if proc.returncode != 0:
        raise StropError(f"strop train {config} failed (exit {proc.returncode}); its output is "
                         "above")


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _size_on_disk(run_dir: Path) -> int:
    """Bytes of the weights a user would ship: the adapter, or the model."""
    names = ("adapter_model.safetensors", "model.safetensors")
    return sum((run_dir / n).stat().st_size for n in names if (run_dir / n).exists())


def run_demo(console=None, spec: WorldSpec | None = None, overrides: Sequence[str] = ()) -> int:
    """The demo, in the working directory's demo-out/. `spec` and `overrides` (strop train
    options for every stage) shrink it for tests; 0 when every claim holds, else 1."""
    from rich.console import Console

    # Wide enough for the results table when output is not a terminal (a log, CI).
    console = console or Console(width=None if sys.stdout.isatty() else 132)
    configs = stage_configs()
    out = OUT
    _claim_output_dir(out, console)
    started = time.perf_counter()

    console.rule("1. a synthetic world")
    data = write_demo_data(out / "data", spec or WorldSpec())
    heldout = data.qa_heldout
    console.print(f"{data.corpus}: {_lines(data.corpus)} documents; {data.qa_train}: "
                  f"{_lines(data.qa_train)} questions to train on; {heldout}: "
                  f"{_lines(heldout)} held out")

    results: dict[str, StageResult] = {}
    for number, name in enumerate(STAGES, start=2):
        config = configs / f"{name}.yml"
        console.rule(f"{number}. {name}: strop train {config.relative_to(configs.parents[1])}")
        cfg = load_config(config).cfg
        total, trainable, planned = _plan(cfg, console)
        _train(config, overrides)
        run_dir = Path(cfg.output_dir)  # where the stage's config writes
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = StageResult(run_dir, summary, trainable, total, planned)

    console.rule("6. exact match on held-out questions")
    scores = _evaluate(results, heldout, console)
    console.rule("7. merge the LoRA adapter into its base, verified")
    merged = _merge(results["lora"].run_dir, out / "lora-merged", console)
    console.rule("8. results")
    console.print(_table(results, scores))
    report = _report(results, out / "report")
    console.print(f"report with plots: {report}")
    ok = _check_targets(scores, merged, console)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


def _evaluate(results: dict[str, StageResult], heldout: Path, console) -> dict[str, dict]:
    """Held-out exact match and eval loss; the full fine-tune's base is the pretrained model."""
    from strop.infer.evaluate import evaluate_run

    scores: dict[str, dict] = {}
    for name in FINE_TUNES:
        result = evaluate_run(results[name].run_dir, data=heldout, base=name == "full",
                              max_new_tokens=8)
        scores[name] = result
        if name == "full":
            scores["pretrain"] = result["base"]
        em = result["generation"]["exact_match"]
        console.print(f"{name}: exact match {em:.1%}")
    console.print(f"pretrain: exact match {scores['pretrain']['generation']['exact_match']:.1%}")
    samples = scores["lora"].get("samples") or []
    for sample in samples[:3]:
        console.print(f"[dim]{sample['prompt'].strip()!r} → {sample['output'].strip()!r} "
                      f"(expected {sample['reference']!r})[/dim]")
    return scores


def _merge(adapter: Path, out: Path, console) -> Any:
    from strop.adapters.merge import merge_adapter

    result = merge_adapter(adapter, out)
    for line in result.messages:
        console.print(line)
    return result


def _table(results: dict[str, StageResult], scores: dict[str, dict]):
    from rich.table import Table

    table = Table(title="strop demo: held-out questions, one seed")
    for column in ("stage", "trained params (of the base)", "weights on disk", "peak RSS (process)",
                   "plan: training memory", "train time", "exact match", "contains",
                   "eval loss"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name in STAGES:
        stage = results[name]
        score = scores.get(name) or {}
        generation = score.get("generation") or {}
        loss = score.get("loss") or {}
        share = f" ({stage.trainable / stage.total_params:.1%})"
        table.add_row(
            name, f"{count_text(stage.trainable)}{share}", size_text(_size_on_disk(stage.run_dir)),
            size_text(stage.summary.get("peak_memory_bytes")), size_text(stage.planned_bytes),
            f"{stage.summary.get('train_seconds', 0):.0f} s",
            f"{generation['exact_match']:.1%}" if generation else "-",
            f"{generation['contains']:.1%}" if generation else "-",
            f"{loss['eval_loss']:.3f}" if loss.get("eval_loss") is not None else "-")
    return table


def _report(results: dict[str, StageResult], out: Path) -> Path:
    from strop.report.html import write_report

    write_report([results[name].run_dir for name in STAGES], out)
    return out / "report.html"


def _check_targets(scores: dict[str, dict], merged: Any, console) -> bool:
    em = {name: scores[name]["generation"]["exact_match"] for name in STAGES}
    checks = [
        (f"fine-tuning teaches the skill: full, LoRA and QLoRA each at least "
         f"{CLEARLY_ABOVE:.0%} above the pretrained model",
         min(em[name] for name in FINE_TUNES) >= em["pretrain"] + CLEARLY_ABOVE),
        (f"LoRA keeps {KEEPS:.0%} of full fine-tuning's exact match",
         em["lora"] >= KEEPS * em["full"]),
        (f"QLoRA keeps {KEEPS:.0%} of LoRA's exact match", em["qlora"] >= KEEPS * em["lora"]),
        ("the merged LoRA model gives the adapter's logits", bool(merged.passed)),
    ]
    for text, ok in checks:
        console.print(f"{'[green]pass[/green]' if ok else '[red]FAIL[/red]'}  {text}")
    return all(ok for _, ok in checks)
