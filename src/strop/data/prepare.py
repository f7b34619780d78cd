"""prepare_data: datasets -> tokenized, masked, split and packed rows (cached).

    sources (rows with locations) -> format (pieces, trained or not) -> encode (ids, labels)
    -> length rules -> merge, shuffle, split -> blocks / packing -> cache

Bad rows are collected across every dataset before anything is decided, so a user sees all
of them (the first 20 and a count) in one run.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from strop.data import cache
from strop.data.encode import Encoder
from strop.data.formats import RowProblem, make_format
from strop.data.packing import blocks, efficiency, pack, split_long
from strop.data.rows import IGNORE, TokenRows
from strop.data.sources import MAX_ROW_BYTES, BadRow, iter_rows
from strop.data.workers import ordered_map
from strop.errors import StropError

CHUNK = 2048          # rows rendered and tokenized together
SHOWN_BAD_ROWS = 20   # bad rows listed in the error; the rest are counted


@dataclass
class DataStats:
    rows: int = 0                  # training rows (after packing / blocks): what batches hold
    documents: int = 0             # source rows kept
    tokens: int = 0                # real tokens in the training rows
    trained_tokens: int = 0        # tokens whose label is not -100
    truncated: int = 0             # rows cut to sequence_len
    dropped_long: int = 0          # rows over sequence_len dropped (drop_long_sequences)
    dropped_short: int = 0         # rows under min_sample_len
    dropped_untrained: int = 0     # rows with nothing left to train
    invalid: int = 0               # bad rows skipped (skip_invalid_rows)
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    packing_efficiency: float | None = None  # real tokens / (rows x sequence_len), when packed
    eval_rows: int = 0
    eval_tokens: int = 0
    sequence_len: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    train: TokenRows
    eval: TokenRows | None
    stats: DataStats
    fingerprint: str = ""
    path: Path | None = None   # the cache entry
    cached: bool = False       # read back from the cache rather than tokenized now


@dataclass
class Part:
    """One dataset entry, tokenized: one row per source row kept."""

    name: str
    rows: TokenRows
    text: bool                 # pretraining text (laid end to end in blocks) or SFT rows
    wheres: list[str]
    bad: list[BadRow]
    counts: Counter
    texts: list[str] = field(default_factory=list)  # the rows' own text (keep_all only)


# ------------------------------------------------------------------------------ one dataset


def _workers(cfg) -> int:
    return cfg.num_proc or os.cpu_count() or 1


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    chunk: list = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_dataset(ds, cfg, tokenizer, encoder: Encoder | None = None,
                     cache_dir: Path | None = None, keep_all: bool = False,
                     on_rows: Callable[[int], None] | None = None,
                     share_prompt: bool = False) -> Part:
    """Read, format and tokenize one `datasets:` entry, applying the length rules.

    keep_all (for `strop data check`) keeps rows that training would drop, untruncated, and
    collects each row's own text (without the template) for duplicate detection.
    """
    if cfg.preference:
        return _tokenize_preference(ds, cfg, tokenizer, encoder or Encoder(tokenizer), cache_dir,
                                    keep_all, on_rows, share_prompt)
    fmt = make_format(ds, cfg, tokenizer)
    encoder = encoder or Encoder(tokenizer)
    done: list[TokenRows] = []  # one per chunk: flat arrays, 4 bytes a token
    wheres: list[str] = []
    texts: list[str] = []
    bad: list[BadRow] = []
    counts: Counter = Counter()

    def work(chunk: list) -> tuple[list, TokenRows, list, list]:
        rendered, places, problems, own = [], [], [], []
        for where, row in chunk:
            if isinstance(row, BadRow):
                problems.append(row)
                continue
            try:
                one = fmt.render(row)
                size = sum(len(p[0]) for p in one.pieces)
                if size > MAX_ROW_BYTES:
                    raise RowProblem(None, f"the row's text is {size / 1e6:.1f} M characters, over "
                                           f"the {MAX_ROW_BYTES / 1e6:.0f} M limit for one row; split it")
                rendered.append(one)
                places.append(where)
                if keep_all:
                    own.append(fmt.corpus_text(row))
            except RowProblem as err:
                problems.append(BadRow(where, err.field, err.problem))
        return places, encoder.encode_rows(rendered), problems, own

    def take(result: tuple[list, TokenRows, list, list]) -> None:
        places, rows, problems, own = result
        bad.extend(problems)
        texts.extend(own)
        if on_rows is not None:
            on_rows(len(places) + len(problems))
        if keep_all:
            done.append(rows)
            wheres.extend(places)
            return
        index, ends = _length_rules(rows, places, fmt.blocks, cfg, counts)
        if len(index) == len(rows) and np.array_equal(ends, rows.offsets[1:]):
            done.append(rows)
            wheres.extend(places)
        else:
            done.append(rows.spans(rows.offsets[index], ends))
            wheres.extend(places[i] for i in index)

    for result in ordered_map(work, _chunks(iter_rows(ds, cache_dir), CHUNK), _workers(cfg)):
        take(result)
    return Part(ds.path, TokenRows.concat(done), fmt.blocks, wheres, bad, counts, texts)


def _tokenize_preference(ds, cfg, tokenizer, encoder: Encoder, cache_dir: Path | None,
                         keep_all: bool, on_rows: Callable[[int], None] | None,
                         share_prompt: bool) -> Part:
    """tokenize_dataset for preference rows: one row per example, two documents each
    (strop.data.preference). keep_all (`strop data check`) keeps every document as its own
    row, untruncated, with its `side` column and its own text."""
    from strop.data.preference import PreferenceFormat, assemble, render_examples

    fmt = PreferenceFormat(ds, cfg, tokenizer)
    done: list[TokenRows] = []
    wheres: list[str] = []
    texts: list[str] = []
    bad: list[BadRow] = []
    counts: Counter = Counter()

    def work(chunk: list) -> tuple[TokenRows, list[int], list[str], list, list[str]]:
        rendered, sides, places, problems = render_examples(fmt, chunk)
        docs = encoder.encode_rows(rendered)
        return docs, sides, places, problems, [r.text for r in rendered] if keep_all else []

    for docs, sides, places, problems, own in ordered_map(
            work, _chunks(iter_rows(ds, cache_dir), CHUNK), _workers(cfg)):
        bad.extend(problems)
        if on_rows is not None:
            on_rows(len(places) + len(problems))
        if keep_all:  # every document its own row; kto's KL documents are not the data's
            from strop.data.preference import KL

            real = np.flatnonzero(np.asarray(sides) != KL)
            side = np.repeat(np.asarray(sides, dtype=np.int8), docs.lengths)
            done.append(docs.with_column("side", side).select(real))
            wheres.extend(places[i // 2] for i in real)
            texts.extend(own[i] for i in real)
            continue
        rows, kept = assemble(docs, sides, places, cfg, counts, share_prompt)
        done.append(rows)
        wheres.extend(kept)
    rows = TokenRows.concat(done) if done else TokenRows.empty(packed=not keep_all)
    return Part(ds.path, rows, False, wheres, bad, counts, texts)


def long_rule(long: np.ndarray, cfg, counts: Counter,
              too_long: Callable[[int], str]) -> tuple[np.ndarray, bool]:
    """excess_length_strategy over `long` (a mask of rows, or of preference pairs, over
    sequence_len): an error naming the first (`too_long(i)` says what it holds), or the mask of
    those kept and whether they are to be cut to sequence_len. Counts what it drops or cuts."""
    keep = np.ones(len(long), dtype=bool)
    if not long.any():
        return keep, False
    if cfg.long_rows == "raise":
        i = int(np.flatnonzero(long)[0])
        raise StropError(f"{too_long(i)}, more than sequence_len {cfg.sequence_len}; raise "
                         "sequence_len, or set excess_length_strategy: truncate (or drop)")
    if cfg.long_rows == "drop":
        counts["dropped_long"] += int(long.sum())
        return ~long, False
    counts["truncated"] += int(long.sum())
    return keep, True


def _length_rules(rows: TokenRows, places: list[str], is_text: bool, cfg,
                  counts: Counter) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the rows training keeps, and where each ends (after truncation).

    A row is counted under the first rule that drops it: too long (drop), shorter than
    min_sample_len, nothing left to train. Pretraining text is never cut: it is laid in blocks.
    """
    starts, ends = rows.offsets[:-1], rows.offsets[1:]
    lengths = ends - starts
    keep = np.ones(len(rows), dtype=bool)
    limit = cfg.sequence_len
    if not is_text:
        kept, cut = long_rule(lengths > limit, cfg, counts,
                              lambda i: f"{places[i]}: the row has {int(lengths[i])} tokens")
        keep &= kept
        if cut:
            ends = np.minimum(ends, starts + limit)
    if cfg.min_sample_len:
        short = keep & (lengths < cfg.min_sample_len)
        counts["dropped_short"] += int(short.sum())
        keep &= ~short
    if not is_text:
        trained = np.concatenate([[0], np.cumsum(rows.labels != IGNORE)])
        untrained = keep & (trained[ends] - trained[starts] == 0)
        counts["dropped_untrained"] += int(untrained.sum())
        keep &= ~untrained
    index = np.flatnonzero(keep)
    return index, ends[index]


# ---------------------------------------------------------------------------- whole config


def _check_responses(docs: TokenRows, is_text: np.ndarray, tokenizer) -> None:
    """Instruction data whose every response is empty would train the end token alone: a
    silent no-op run, so it is an error (completion text always has content)."""
    if is_text.all():
        return
    trained = docs.input_ids[docs.labels != IGNORE]
    special = np.asarray(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])))
    if trained.size and not np.isin(trained, special, invert=True).any():
        raise StropError("every response in the training data is empty: only end-of-turn tokens "
                         "would be trained; check the response field (field_output, the "
                         "assistant turns, roles_to_train)")


def _bad_rows_error(bad: list[BadRow]) -> StropError:
    lines = [str(b) for b in bad[:SHOWN_BAD_ROWS]]
    more = len(bad) - len(lines)
    tail = (f"... and {more} more bad rows; " if more else "") + \
        "fix them, or set skip_invalid_rows: true to train on the valid rows"
    head = f"{len(bad)} bad row{'s' if len(bad) != 1 else ''} in the data"
    return StropError(head, [head + ":", *lines, tail])


def reason_of(bad: BadRow) -> str:
    """A short category for counting skipped rows: 'output: missing field'."""
    problem = bad.problem
    if "limit for one row" in problem:
        problem = "row over the size limit"
    for cut in (" (", ";", ","):
        problem = problem.split(cut)[0]
    if problem.startswith("unknown role"):
        problem = "unknown role"
    field_name = bad.field.split("[")[0].split(".")[-1] if bad.field else ""
    return f"{field_name + ': ' if field_name else ''}{problem}"


def _assemble(rows: TokenRows, is_text: np.ndarray, sequence_len: int, packing: bool) -> TokenRows:
    if is_text.all() or not is_text.any():  # one kind: no copy
        text, sft = (rows, TokenRows.empty()) if is_text.any() else (TokenRows.empty(), rows)
    else:
        text = rows.select(np.flatnonzero(is_text))
        sft = rows.select(np.flatnonzero(~is_text))
    if sft.packed and not len(text):  # preference rows: two documents each, never split
        return pack(sft, 2 * sequence_len) if packing else sft
    if packing:
        return pack(TokenRows.concat([split_long(text, sequence_len), sft]), sequence_len)
    return TokenRows.concat([blocks(text, sequence_len), sft])


def _eval_count(cfg, n: int) -> int:
    size = cfg.val_set_size
    count = round(size * n) if size < 1 else int(size)
    if size and count == 0:
        count = 1
    if count >= n:
        raise StropError(f"val_set_size {size} leaves no training rows out of {n}; use a smaller "
                         "fraction or count")
    return count


def build(cfg, tokenizer, log: Callable[[str], None] | None = None, share_prompt: bool = False
          ) -> tuple[TokenRows, TokenRows | None, DataStats]:
    """Tokenize every dataset of the config and assemble the training and eval rows.
    share_prompt: preference rows compute their prompt once (strop.data.preference.assemble)."""
    say = log or (lambda _: None)
    encoder = Encoder(tokenizer)
    hf_cache = cache.cache_root(cfg) / "hf-datasets"
    parts, test_parts = [], []
    for group, out in (("datasets", parts), ("test_datasets", test_parts)):
        for ds in getattr(cfg, group) or []:
            start = time.perf_counter()
            with _progress(ds.path, enabled=log is not None) as on_rows:
                part = tokenize_dataset(ds, cfg, tokenizer, encoder, hf_cache, on_rows=on_rows,
                                        share_prompt=share_prompt)
            say(f"{ds.path}: {len(part.rows)} rows, {part.rows.num_tokens} tokens"
                f"{f', {len(part.bad)} bad' if part.bad else ''} "
                f"({time.perf_counter() - start:.1f}s)")
            out.append(part)
    bad = [b for p in parts + test_parts for b in p.bad]
    if bad and not cfg.skip_invalid_rows:
        raise _bad_rows_error(bad)

    stats = DataStats(sequence_len=cfg.sequence_len, invalid=len(bad),
                      invalid_reasons=dict(Counter(reason_of(b) for b in bad).most_common()))
    for p in parts:
        for key in ("truncated", "dropped_long", "dropped_short", "dropped_untrained"):
            setattr(stats, key, getattr(stats, key) + p.counts[key])

    docs = TokenRows.concat([p.rows for p in parts])
    is_text = np.concatenate([np.full(len(p.rows), p.text) for p in parts]) if parts else \
        np.zeros(0, dtype=bool)
    if len(docs) == 0:
        raise StropError(f"no training rows are left after filtering ({_filter_summary(stats)}); "
                         "check the datasets' paths, formats and sequence_len")
    _check_responses(docs, is_text, tokenizer)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(docs))
    eval_rows = None
    if test_parts:
        test_docs = TokenRows.concat([p.rows for p in test_parts])
        test_text = np.concatenate([np.full(len(p.rows), p.text) for p in test_parts])
        if len(test_docs) == 0:
            raise StropError("test_datasets has no usable rows after filtering")
        eval_rows = _assemble(test_docs, test_text, cfg.sequence_len, cfg.effective_eval_packing)
        train_idx = order
    elif cfg.val_set_size:
        k = _eval_count(cfg, len(docs))
        eval_idx = np.sort(order[:k])
        eval_rows = _assemble(docs.select(eval_idx), is_text[eval_idx], cfg.sequence_len,
                              cfg.effective_eval_packing)
        train_idx = order[k:]
    else:
        train_idx = order
    if not cfg.shuffle_merged_datasets or cfg.sample_packing:
        # Packing sorts rows by length anyway (and BatchPlan shuffles every epoch).
        train_idx = np.sort(train_idx)
    train_docs = docs if len(train_idx) == len(docs) and (train_idx[:1] == 0).all() and \
        (np.diff(train_idx) == 1).all() else docs.select(train_idx)
    train = _assemble(train_docs, is_text[train_idx], cfg.sequence_len, cfg.sample_packing)

    stats.documents = len(train_idx)
    stats.rows = len(train)
    stats.tokens = train.num_tokens
    stats.trained_tokens = train.num_trained
    if cfg.sample_packing or is_text.all():
        stats.packing_efficiency = round(efficiency(train, cfg.sequence_len), 4)
    if eval_rows is not None:
        stats.eval_rows = len(eval_rows)
        stats.eval_tokens = eval_rows.num_tokens
    return train, eval_rows, stats


@contextmanager
def _progress(name: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A live row count on a terminal (stderr), nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}: {task.completed:,} rows"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"tokenizing {name}", total=None)
        yield lambda n: bar.advance(task, n)


def _filter_summary(stats: DataStats) -> str:
    parts = [f"{stats.invalid} invalid", f"{stats.dropped_long} too long",
             f"{stats.dropped_short} shorter than min_sample_len",
             f"{stats.dropped_untrained} with nothing to train"]
    return ", ".join(parts)


def prepare_data(cfg, tokenizer, *, use_cache: bool = True,
                 log: Callable[[str], None] | None = None,
                 share_prompt: bool = False) -> PreparedData:
    """Tokenized, masked, split and packed rows for a config, from the cache when it has them.

    Returns PreparedData: `train` and `eval` (None without evaluation data) are sequences of
    rows {"input_ids", "labels"[, "position_ids"]}; `stats` the figures of the preparation.
    """
    share_prompt = share_prompt and cfg.preference
    fingerprint = cache.data_fingerprint(cfg, tokenizer, share_prompt)
    folder = cache.cache_root(cfg) / fingerprint
    if use_cache:
        hit = cache.load(folder)
        if hit is not None:
            train, evaluation, stats = hit
            return PreparedData(train, evaluation, DataStats(**stats), fingerprint, folder, True)
    train, evaluation, stats = build(cfg, tokenizer, log, share_prompt)
    if use_cache:
        cache.save(folder, train, evaluation, stats.as_dict())
        # Memory-map what was saved, as a cache hit would, so both paths behave the same.
        train = TokenRows.load(folder / "train")
        evaluation = TokenRows.load(folder / "eval") if evaluation is not None else None
    return PreparedData(train, evaluation, stats, fingerprint, folder if use_cache else None, False)


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr)
