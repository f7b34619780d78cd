"""Read what a run wrote: metrics.jsonl (kind train / eval records from strop.train.log),
summary.json and strop-config.yml."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strop.errors import StropError


@dataclass
class RunRecord:
    path: Path
    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    config_text: str | None = None
    bad_lines: int = 0


def read_run(path: Path, name: str | None = None) -> RunRecord:
    if not path.is_dir():
        raise StropError(f"{path}: no such run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise StropError(f"{path}: no metrics.jsonl (is it a strop run directory? training writes "
                         "it from the first logged step)")
    run = RunRecord(path, name or path.resolve().name)
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            run.bad_lines += 1  # a run killed mid-write leaves a torn last line
            continue
        if not isinstance(record, dict) or "step" not in record:
            run.bad_lines += 1
            continue
        (run.eval if record.get("kind") == "eval" else run.train).append(record)
    if not run.train and not run.eval:
        raise StropError(f"{metrics}: no logged steps yet")
    summary = path / "summary.json"
    if summary.is_file():
        try:
            run.summary = json.loads(summary.read_text())
        except json.JSONDecodeError:
            run.summary = None
    config = path / "strop-config.yml"
    if config.is_file():
        run.config_text = config.read_text()
    return run


def unique_names(paths: list[Path]) -> list[str]:
    """Legend names: the directory names, with their parent when two runs share a name."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
            for p, n in zip(paths, names, strict=True)]
