"""The prepared-data cache: tokenized rows saved under a fingerprint of everything that shapes
them, so `strop preprocess` tokenizes once and `strop train` reuses the result.

The fingerprint covers the data's contents (file bytes; a hub dataset's id, subset, split and
revision), each dataset entry, the tokenizer (its full serialised pipeline and vocabulary,
special tokens and chat template), the chat templates chosen, and the config keys that change
the rows. A change to any of them is a miss; nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from strop.data.rows import TokenRows
from strop.data.sources import resolve

# Bump when strop's data code changes what it writes for the same inputs.
FORMAT_VERSION = 1
DEFAULT_DIR = ".strop-cache/prepared"

# Config keys that change the prepared rows.
KEYS = ("sequence_len", "sample_packing", "eval_sample_packing", "train_on_inputs",
        "excess_length_strategy", "drop_long_sequences", "min_sample_len", "skip_invalid_rows",
        "val_set_size", "seed", "shuffle_merged_datasets", "objective", "chat_template",
        "chat_template_jinja", "rl")


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides a tokenizer's ids: its pipeline and vocabulary, special tokens,
    chat template and class."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()


def data_fingerprint(cfg, tokenizer, share_prompt: bool = False) -> str:
    from strop.data.templates import jinja_text

    parts: dict[str, Any] = {"version": FORMAT_VERSION, "share_prompt": share_prompt,
                             "keys": {k: getattr(cfg, k) for k in KEYS},
                             "tokenizer": tokenizer_fingerprint(tokenizer)}
    if cfg.chat_template_jinja:
        parts["jinja"] = jinja_text(cfg.chat_template_jinja)
    for group in ("datasets", "test_datasets"):
        entries = []
        for ds in getattr(cfg, group) or []:
            files = []
            for source in resolve(ds):
                if source.path is not None:
                    files.append([source.name, _file_digest(source.path)])
                else:
                    files.append([source.name, ds.name, ds.split, ds.revision])
            jinja = jinja_text(ds.chat_template_jinja) if ds.chat_template_jinja else None
            entries.append({"entry": ds.model_dump(mode="json"), "files": files, "jinja": jinja})
        parts[group] = entries
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_root(cfg) -> Path:
    return Path(cfg.dataset_prepared_path or DEFAULT_DIR)


def load(folder: Path) -> tuple[TokenRows, TokenRows | None, dict[str, Any]] | None:
    """The cached rows and stats in `folder`, or None when there is no complete entry."""
    if not (folder / "stats.json").is_file():
        return None
    stats = json.loads((folder / "stats.json").read_text())
    train = TokenRows.load(folder / "train")
    evaluation = TokenRows.load(folder / "eval") if (folder / "eval").is_dir() else None
    return train, evaluation, stats


def save(folder: Path, train: TokenRows, evaluation: TokenRows | None, stats: dict[str, Any]) -> None:
    """Write atomically: a half-written entry (a killed preprocess) is never read back."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        train.save(tmp / "train")
        if evaluation is not None:
            evaluation.save(tmp / "eval")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
