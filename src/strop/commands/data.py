"""The data verbs behind the CLI: `strop preprocess` and `strop data check`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from strop.errors import StropError


def preprocess(cfg) -> None:
    from strop.data.prepare import prepare_data, stderr_log
    from strop.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    share_prompt = False
    if cfg.preference:  # the layout training will read (strop.train.loop.setup)
        from strop.recipe.decide import decide_for

        share_prompt = decide_for(cfg, tokenizer).varlen
    data = prepare_data(cfg, tokenizer, log=stderr_log, share_prompt=share_prompt)
    s = data.stats
    state = "reused" if data.cached else "written"
    typer.echo(f"prepared data {state}: {data.path}")
    typer.echo(f"  train   {s.rows} rows from {s.documents} documents, {s.tokens} tokens "
               f"({s.trained_tokens} trained)")
    if data.eval is not None:
        typer.echo(f"  eval    {s.eval_rows} rows, {s.eval_tokens} tokens")
    if s.packing_efficiency is not None:
        typer.echo(f"  packing {s.packing_efficiency * 100:.1f}% of token slots used")
    dropped = {"truncated": s.truncated, "dropped (too long)": s.dropped_long,
               "dropped (under min_sample_len)": s.dropped_short,
               "dropped (nothing to train)": s.dropped_untrained}
    for label, count in dropped.items():
        if count:
            typer.echo(f"  {label}: {count} rows")
    if s.invalid:
        typer.echo(f"  skipped {s.invalid} bad rows (skip_invalid_rows):")
        for reason, count in s.invalid_reasons.items():
            typer.echo(f"    {count}  {reason}")


def _file_config(target: Path, type_: str | None, tokenizer: str | None, sequence_len: int | None):
    from strop.config import load_dict

    if not type_ or not tokenizer:
        raise StropError(f"{target} is a data file: give its format and a tokenizer, e.g. strop "
                         f"data check {target} --type alpaca --tokenizer path/to/model")
    data = {"base_model": tokenizer, "datasets": [{"path": str(target), "type": type_}],
            # learning_rate is required by the schema; data check never trains.
            "learning_rate": 1e-4}
    if sequence_len:
        data["sequence_len"] = sequence_len
    return load_dict(data).cfg


def data_check(target: Path, type_: str | None, tokenizer: str | None, sequence_len: int | None,
               show: int, as_json: bool, png: Path, strict: bool = True) -> None:
    from rich.console import Console

    from strop.config import load_config
    from strop.data import lint
    from strop.model.tokenizer import load_tokenizer

    if target.suffix.lower() in (".yml", ".yaml"):
        overrides = [f"--sequence_len={sequence_len}"] if sequence_len else []
        cfg = load_config(target, overrides).cfg
    else:
        cfg = _file_config(target, type_, tokenizer, sequence_len)
    tok = load_tokenizer(cfg)
    checked = lint.check(cfg, tok)
    saved = lint.save_png(checked, png)
    figures = dict(checked.figures, histogram_png=str(saved))
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        _gate(figures, strict)
        return
    for line in lint.report_lines(figures):
        typer.echo(line)
    typer.echo("")
    for title, values in (("prompt", checked.prompt_lengths), ("response", checked.response_lengths)):
        for line in lint.histogram_lines(values, title):
            typer.echo(line)
    typer.echo(f"histograms saved to {saved}")
    if show:
        console = Console(highlight=False)
        legend = "trained: bold green" if console.is_terminal else "trained: inside ⟦ ⟧"
        for i in range(min(show, len(checked.rows))):
            console.rule(f"sample {i + 1} ({legend}, masked: dim)")
            console.print(lint.sample_text(checked.rows, i, tok, plain=not console.is_terminal))
    _gate(figures, strict)


def _gate(figures: dict, strict: bool) -> None:
    """Exit non-zero (after the report) when the data cannot train well: CI can gate on it."""
    problems = []
    if figures["valid_rows"] == 0:
        problems.append("no usable rows")
    if figures["invalid_rows"]:
        problems.append(f"{figures['invalid_rows']} invalid row(s), listed above")
    if figures["valid_rows"] and figures["empty_responses"] == figures["valid_rows"]:
        problems.append("every response is empty")
    pairs = figures.get("preference", {})
    if pairs.get("identical_pairs"):
        problems.append(f"{pairs['identical_pairs']} pair(s) whose chosen and rejected responses "
                        "are the same")
    if problems and strict:
        raise StropError(f"the dataset fails the check: {'; '.join(problems)}; fix the data, or "
                         "pass --no-strict to report without failing")
