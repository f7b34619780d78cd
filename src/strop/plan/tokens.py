"""Tokens per epoch, estimated from the training files before any tokenization.

`estimate_tokens(cfg)` is the one entry point: it reads a sample of rows from each local
dataset file, turns characters into tokens with the model's own tokenizer when one is on disk
(else a documented average), and lays the row lengths out as training will (packed rows of
sequence_len, or padded micro-batches). When strop.data's prepared cache exists, this is the
function to switch to its exact counts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strop.config.schema import StropConfig

# Characters per token of English text under the byte-level BPE vocabularies of current base
# models (Llama 3, Qwen 2.5, Mistral): about 4. Used only when no tokenizer is on disk.
DEFAULT_CHARS_PER_TOKEN = 4.0
# Tokens a prompt template adds to each row (role markers, "### Instruction:", BOS/EOS): a
# round figure for alpaca and chat templates.
TEMPLATE_TOKENS_PER_ROW = 12
SAMPLE_ROWS = 2000


@dataclass(frozen=True)
class TokenEstimate:
    tokens_per_epoch: float | None  # tokens the model processes per epoch (padding included)
    text_tokens: float | None       # tokens of the rows themselves (no padding)
    rows: int | None                # training rows per epoch
    chars_per_token: float
    source: str                     # how the figure was reached, for the report
    missing: tuple[str, ...] = ()   # datasets that could not be read offline


def _row_text(row: Any) -> str:
    """All the text of a row: every string value, nested lists and dicts included."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        return " ".join(_row_text(v) for v in row.values())
    if isinstance(row, list):
        return " ".join(_row_text(v) for v in row)
    return ""


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".txt"))
    return [path] if path.is_file() else sorted(path.parent.glob(path.name))


def _sample_file(path: Path, rng: random.Random) -> tuple[int, list[int]]:
    """(rows in the file, character counts of up to SAMPLE_ROWS sampled rows)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get("data", [data])
        lengths = [len(_row_text(r)) for r in rows]
        return len(lengths), rng.sample(lengths, min(len(lengths), SAMPLE_ROWS))
    lengths: list[int] = []
    count = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            count += 1
            # Reservoir sampling keeps memory flat on large files.
            if len(lengths) < SAMPLE_ROWS:
                lengths.append(_line_chars(line, path))
            else:
                slot = rng.randrange(count)
                if slot < SAMPLE_ROWS:
                    lengths[slot] = _line_chars(line, path)
    return count, lengths


def _line_chars(line: str, path: Path) -> int:
    if path.suffix == ".jsonl":
        try:
            return len(_row_text(json.loads(line)))
        except json.JSONDecodeError:
            return len(line)
    return len(line)


def chars_per_token(cfg: StropConfig, sample: list[str]) -> tuple[float, str]:
    """Measured with the tokenizer when it is on disk (base_model or tokenizer_config as a
    local directory), else DEFAULT_CHARS_PER_TOKEN."""
    from strop.model.gguf import cache_dir_if_converted

    source = cfg.tokenizer_config or cfg.model_source
    source = cache_dir_if_converted(source) or source
    if source and Path(source).is_dir() and sample:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source)
            tokens = sum(len(tok(text)["input_ids"]) for text in sample[:500])
            chars = sum(len(text) for text in sample[:500])
            if tokens:
                return chars / tokens, f"measured with the tokenizer in {source}"
        except (OSError, ValueError):
            pass
    return DEFAULT_CHARS_PER_TOKEN, f"assumed {DEFAULT_CHARS_PER_TOKEN:g} characters per token"


def estimate_tokens(cfg: StropConfig, base_dir: Path | None = None, seed: int = 0) -> TokenEstimate:
    """Tokens per epoch for `cfg`'s training datasets (paths relative to `base_dir`)."""
    rng = random.Random(seed)
    rows_total = 0
    lengths: list[tuple[int, float]] = []  # (characters of a sampled row, rows it stands for)
    texts: list[str] = []
    missing: list[str] = []
    for dataset in cfg.datasets:
        path = Path(dataset.path)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        files = _files(path)
        if not files:
            missing.append(dataset.path)
            continue
        for file in files:
            count, sample = _sample_file(file, rng)
            rows_total += count
            # Scale the sample to the file: each sampled row stands for count / len(sample).
            weight = count / max(len(sample), 1)
            lengths.extend((n, weight) for n in sample)
            if len(texts) < 500:
                texts.extend(_first_texts(file, 500 - len(texts)))
    if missing and not lengths:
        return TokenEstimate(None, None, None, DEFAULT_CHARS_PER_TOKEN,
                             "dataset not on disk", tuple(missing))
    cpt, how = chars_per_token(cfg, texts)
    train_share = _train_share(cfg, rows_total)
    row_tokens = [(min(chars / cpt + TEMPLATE_TOKENS_PER_ROW, cfg.sequence_len), w)
                  for chars, w in lengths]
    text_tokens = sum(t * w for t, w in row_tokens) * train_share
    rows = int(rows_total * train_share)
    processed = _processed_tokens(cfg, row_tokens, text_tokens, rows, rng)
    return TokenEstimate(processed, text_tokens, rows, cpt,
                         f"{rows_total} rows read from disk; {how}", tuple(missing))


def _first_texts(path: Path, limit: int) -> list[str]:
    texts = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if len(texts) >= limit:
                break
            if line.strip():
                try:
                    texts.append(_row_text(json.loads(line)) if path.suffix == ".jsonl" else line)
                except json.JSONDecodeError:
                    texts.append(line)
    return texts


def _train_share(cfg: StropConfig, rows: int) -> float:
    if cfg.test_datasets or cfg.val_set_size <= 0 or rows == 0:
        return 1.0
    held = cfg.val_set_size if cfg.val_set_size < 1 else cfg.val_set_size / rows
    return max(0.0, 1.0 - held)


def _processed_tokens(cfg: StropConfig, row_tokens: list[tuple[float, float]], text_tokens: float,
                      rows: int, rng: random.Random) -> float:
    """Tokens the model runs over: packed rows are full sequence_len blocks; unpacked rows are
    padded to sequence_len (pad_to_sequence_len) or to the longest row of their micro-batch."""
    seq = cfg.sequence_len
    if cfg.sample_packing:
        return math.ceil(text_tokens / seq) * seq
    if cfg.pads_to_sequence_len:
        return float(rows * seq)
    lengths = [t for t, _ in row_tokens]
    if not lengths:
        return 0.0
    batch = cfg.micro_batch_size
    rng.shuffle(lengths)
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch])
                 for i in range(0, len(lengths), batch))
    return text_tokens * padded / sum(lengths)
