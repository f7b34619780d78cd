"""Helpers for the data tests: configs in one line, rows written to files, trained-token runs."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from strop.config import load_dict

IGNORE = -100


def config(datasets: list[dict[str, Any]] | None = None, **keys: Any):
    data: dict[str, Any] = {"base_model": "unused", "learning_rate": 1e-4,
                            "datasets": datasets or [{"path": "unused.jsonl", "type": "alpaca"}]}
    data.update(keys)
    return load_dict(data).cfg


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def runs(ids: list[int], labels: list[int], tok) -> list[str]:
    """The trained tokens, decoded run by run (a run = consecutive trained tokens)."""
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True)), \
        "a label is neither -100 nor its token"
    out, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            current.append(i)
        elif current:
            out.append(tok.decode(current))
            current = []
    if current:
        out.append(tok.decode(current))
    return out


def encode_one(tok, cfg, row: dict[str, Any], ds_index: int = 0):
    from strop.data.encode import Encoder
    from strop.data.formats import make_format

    fmt = make_format(cfg.datasets[ds_index], cfg, tok)
    return Encoder(tok).encode([fmt.render(row)])[0]


@functools.cache
def bpe():
    """The tiny byte-level BPE tokenizer (BOS <s> prepended, EOS </s>, ChatML markers), built
    once per session; tests that change a tokenizer deep-copy it first."""
    from conftest import make_tokenizer

    return make_tokenizer("bpe")
