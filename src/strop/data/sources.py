"""Where rows come from: local files and folders (JSON, JSONL, CSV, Parquet, Arrow, text) and
Hugging Face hub datasets, each row with the place it came from (`file:line` or `file row N`).

JSON, JSONL and text are read here line by line, so a line that is not JSON, is not UTF-8 or is
too large becomes one bad row with its line number instead of failing the whole file. CSV,
Parquet and Arrow go through `datasets`, which reads them column-wise and fast.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strop.config.datasets import DatasetConfig
from strop.errors import StropError

# One row (a JSONL line, a document) above this is almost surely a mistake (a whole corpus on
# one line, a binary file); it is reported as a bad row rather than tokenized for minutes.
MAX_ROW_BYTES = 32 * 1024 * 1024

EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
              ".arrow": "arrow", ".txt": "text", ".text": "text", ".md": "text"}


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, with where it is and what is wrong."""

    where: str
    field: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field + ': ' if self.field else ''}{self.problem}"


@dataclass(frozen=True)
class Source:
    """One file of a dataset entry, or a hub dataset."""

    name: str        # what messages call it: a path as the user wrote it, or the hub id
    kind: str        # json | csv | parquet | arrow | text | hub
    path: Path | None


Row = tuple[str, "dict[str, Any] | BadRow"]  # (where, row or what is wrong with it)


def resolve(ds: DatasetConfig) -> list[Source]:
    """The files a `datasets:` entry names, or its hub dataset."""
    path = ds.path
    patterns: list[str]
    if ds.data_files:
        files = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files)
        base = path if Path(path).is_dir() else ""
        patterns = [os.path.join(base, f) for f in files]
    else:
        patterns = [path]
    found: list[Path] = []
    for pattern in patterns:
        target = Path(pattern).expanduser()
        if target.is_file():
            found.append(target)
        elif target.is_dir():
            found += sorted(p for p in target.rglob("*") if p.is_file() and _kind(p, ds) is not None)
        elif glob.has_magic(pattern):
            found += sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                            if Path(p).is_file())
    if found:
        sources = []
        for file in dict.fromkeys(found):
            kind = _kind(file, ds)
            if kind is None:
                raise StropError(f"{file}: strop cannot tell the file type from its extension; set "
                                 "ds_type (json, csv, parquet, arrow or text) on the dataset entry")
            sources.append(Source(str(file), kind, file))
        return sources
    if _looks_like_hub_id(path) and not ds.data_files:
        return [Source(path, "hub", None)]
    what = "no files match" if any(glob.has_magic(p) for p in patterns) else "no such file or folder"
    raise StropError(f"datasets path {path}: {what}; give a local file, folder or glob (relative to "
                     f"{Path.cwd()}), or a Hugging Face dataset id such as tatsu-lab/alpaca")


def _kind(file: Path, ds: DatasetConfig) -> str | None:
    if ds.ds_type:
        return ds.ds_type
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return (len(parts) <= 2 and all(parts) and not path.startswith((".", "~"))
            and Path(path).suffix.lower() not in EXTENSIONS)


# ------------------------------------------------------------------------------------- reading


def iter_rows(ds: DatasetConfig, cache_dir: Path | None = None) -> Iterator[Row]:
    """Every row of a dataset entry, in order, with its location; bad lines as `BadRow`s."""
    sources = resolve(ds)
    for source in sources:
        rows = _read(source, ds, cache_dir)
        if ds.shards:
            rows = _shard(rows, ds.shards, ds.shards_idx or 0, source, ds, cache_dir)
        yield from rows


def _read(source: Source, ds: DatasetConfig, cache_dir: Path | None) -> Iterator[Row]:
    if source.kind == "json":
        return _read_json(source)
    if source.kind == "text":
        return _read_text(source, ds.field or "text")
    if source.kind == "hub":
        return _read_hub(source, ds)
    return _read_tabular(source, cache_dir)


def _shard(rows: Iterator[Row], shards: int, index: int, source: Source, ds: DatasetConfig,
           cache_dir: Path | None) -> Iterator[Row]:
    """Contiguous shard `index` of `shards`, like `datasets.Dataset.shard(contiguous=True)`."""
    if index >= shards:
        raise StropError(f"{source.name}: shards_idx {index} is out of range for shards: {shards} "
                         f"(use 0 to {shards - 1})")
    if ds.streaming:  # the length is unknown: take every shards-th row
        return (row for i, row in enumerate(rows) if i % shards == index)
    everything = list(rows)
    size, extra = divmod(len(everything), shards)
    start = index * size + min(index, extra)
    return iter(everything[start:start + size + (index < extra)])


def _lines(source: Source) -> Iterator[tuple[int, bytes]]:
    assert source.path is not None
    opener = _open_gz if source.path.suffix.lower() == ".gz" else open
    with opener(source.path, "rb") as handle:
        yield from enumerate(handle, start=1)


def _open_gz(path: Path, mode: str):
    import gzip

    return gzip.open(path, mode)


def _decode(source: Source, number: int, line: bytes) -> str | BadRow:
    where = f"{source.name}:{number}"
    if len(line) > MAX_ROW_BYTES:
        return BadRow(where, None, f"line is {len(line) / 1e6:.1f} MB, over the "
                                   f"{MAX_ROW_BYTES / 1e6:.0f} MB limit for one row; split it")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRow(where, None, f"invalid UTF-8 (byte {line[err.start]:#04x} at column "
                                   f"{err.start + 1}); re-save the file as UTF-8")


def _read_json(source: Source) -> Iterator[Row]:
    """JSON Lines, or one JSON array of objects (detected by a leading '[')."""
    assert source.path is not None
    with open(source.path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from _read_json_array(source)
        return
    for number, line in _lines(source):
        if not line.strip():
            continue
        text = _decode(source, number, line)
        where = f"{source.name}:{number}"
        if isinstance(text, BadRow):
            yield where, text
            continue
        try:
            row = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            yield where, BadRow(where, None, f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            yield where, BadRow(where, None, f"expected a JSON object {{...}}, got "
                                             f"{type(row).__name__}")
            continue
        yield where, row


def _read_json_array(source: Source) -> Iterator[Row]:
    assert source.path is not None
    data = source.path.read_bytes()
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise StropError(f"{source.name}:{line}: invalid UTF-8; re-save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise StropError(f"{source.name}:{err.lineno}: not valid JSON ({err.msg} at column "
                         f"{err.colno})") from None
    if not isinstance(rows, list):
        raise StropError(f"{source.name}: expected a JSON array of objects or JSON Lines")
    for i, row in enumerate(rows, start=1):
        where = f"{source.name} row {i}"
        if not isinstance(row, dict):
            yield where, BadRow(where, None, f"expected a JSON object {{...}}, got {type(row).__name__}")
        else:
            yield where, row


def _read_text(source: Source, field: str) -> Iterator[Row]:
    """Plain text: one document per non-empty line."""
    for number, line in _lines(source):
        if not line.strip():
            continue
        text = _decode(source, number, line)
        where = f"{source.name}:{number}"
        yield where, (text if isinstance(text, BadRow) else {field: text.rstrip("\r\n")})


def _read_tabular(source: Source, cache_dir: Path | None) -> Iterator[Row]:
    import datasets

    builder = {"csv": "csv", "parquet": "parquet", "arrow": "arrow"}[source.kind]
    try:
        table = datasets.load_dataset(builder, data_files=[str(source.path)], split="train",
                                      cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # a malformed file: pyarrow's parser errors vary by format
        raise StropError(f"{source.name}: cannot read it as {source.kind} ({_first_line(err)})") from None
    yield from _table_rows(table, source.name)


def _table_rows(table: Any, name: str) -> Iterator[Row]:
    number = 0
    for batch in table.iter(batch_size=1000):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            number += 1
            where = f"{name} row {number}"
            yield where, dict(zip(keys, values, strict=True))


def _read_hub(source: Source, ds: DatasetConfig) -> Iterator[Row]:
    # The user's own hub cache (HF_HOME), not strop's: a dataset downloaded before is reused.
    import datasets

    try:
        table = datasets.load_dataset(source.name, name=ds.name, split=ds.split,
                                      revision=ds.revision, streaming=ds.streaming)
    except Exception as err:  # offline, unknown id, gated, bad split: say which and what to do
        raise StropError(f"dataset {source.name!r} could not be loaded from the Hugging Face hub "
                         f"({_first_line(err)}); download it once with network access, or point "
                         f"path at a local copy (a .jsonl/.parquet file or folder)") from None
    if ds.streaming:
        for number, row in enumerate(table, start=1):
            yield f"{source.name} row {number}", row
    else:
        yield from _table_rows(table, f"{source.name} ({ds.split})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
