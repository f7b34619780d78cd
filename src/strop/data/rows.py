"""Tokenized rows stored flat: one int32 array per column and an offsets array.

100k rows as Python lists of lists cost ~100 bytes per token and seconds to build; flat numpy
arrays cost 4 bytes per token, save and load as `.npy` files, and can be memory-mapped so a
corpus larger than RAM trains from disk. Indexing a row returns plain lists, the contract the
training loop codes against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np

IGNORE = -100  # label of a token that is not trained
COLUMNS = ("input_ids", "labels", "position_ids")


class TokenRows(Sequence):
    """Rows `{"input_ids", "labels"[, "position_ids"], *extra}` over flat arrays.

    `offsets[i]:offsets[i + 1]` is row i's slice of every column. `position_ids` is present only
    for packed rows (positions restart at 0 for each document inside a row). `extra` holds more
    per-token columns that travel with the tokens through selection, packing and the cache
    (preference rows: which side of a pair a token belongs to, and its reference log-prob).
    """

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 position_ids: np.ndarray | None = None,
                 extra: dict[str, np.ndarray] | None = None):
        if len(input_ids) != len(labels) or offsets[-1] != len(input_ids):
            raise ValueError("input_ids, labels and offsets disagree")
        self.input_ids = input_ids
        self.labels = labels
        self.offsets = offsets
        self.position_ids = position_ids
        self.extra = dict(extra or {})
        if any(len(column) != len(input_ids) for column in self.extra.values()):
            raise ValueError("an extra column's length is not the number of tokens")

    def with_column(self, name: str, values: np.ndarray) -> TokenRows:
        """The same rows with one more per-token column."""
        return TokenRows(self.input_ids, self.labels, self.offsets, self.position_ids,
                         {**self.extra, name: values})

    @classmethod
    def empty(cls, packed: bool = False) -> TokenRows:
        z = np.zeros(0, dtype=np.int32)
        return cls(z, z.copy(), np.zeros(1, dtype=np.int64), z.copy() if packed else None)

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> TokenRows:
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
        flat_labels = np.fromiter(chain.from_iterable(labels), dtype=np.int32, count=total)
        return cls(flat_ids, flat_labels, offsets)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def attended_length(self) -> float:
        """Token-weighted mean length of the documents (a packed row's documents, or each
        row): how far, on average, a token's attention reaches over the full square. What the
        attention term of FLOPs per token needs, where sequence_len overstates it."""
        if self.packed:
            starts = np.flatnonzero(np.asarray(self.position_ids) == 0)
            bounds = np.union1d(starts, self.offsets)  # a row's end also ends its last document
            docs = np.diff(bounds)
        else:
            docs = self.lengths
        docs = docs[docs > 0].astype(np.float64)
        return float((docs * docs).sum() / docs.sum()) if docs.size else 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE))

    def trained_per_row(self) -> np.ndarray:
        """Trained tokens of each row, (n,)."""
        trained = np.concatenate([[0], np.cumsum(self.labels != IGNORE)])
        return trained[self.offsets[1:]] - trained[self.offsets[:-1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        row = {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}
        if self.position_ids is not None:
            row["position_ids"] = self.position_ids[a:b].tolist()
        for name, column in self.extra.items():
            row[name] = column[a:b].tolist()
        return row

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Row i as numpy views (no copy): what the collator reads."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        row = {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b]}
        if self.position_ids is not None:
            row["position_ids"] = self.position_ids[a:b]
        for name, column in self.extra.items():
            row[name] = column[a:b]
        return row

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenRows:
        """The rows at `indices`, in that order, as new flat arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        return self.spans(self.offsets[indices], self.offsets[indices + 1])

    def spans(self, starts: np.ndarray, ends: np.ndarray) -> TokenRows:
        """Rows made of the flat slices [starts[k], ends[k]) (a selection, possibly truncated)."""
        gather = ranges(starts, ends)
        offsets = np.zeros(len(starts) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        pos = self.position_ids[gather] if self.position_ids is not None else None
        return TokenRows(self.input_ids[gather], self.labels[gather], offsets, pos,
                         {name: column[gather] for name, column in self.extra.items()})

    @staticmethod
    def concat(parts: Iterable[TokenRows]) -> TokenRows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return TokenRows.empty()
        if len({p.packed for p in parts}) > 1:
            raise ValueError("cannot mix packed and unpacked rows")
        if len({tuple(sorted(p.extra)) for p in parts}) > 1:
            raise ValueError("cannot mix rows with different columns")
        if len(parts) == 1:
            return parts[0]
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pos = np.concatenate([p.position_ids for p in parts]) if parts[0].packed else None
        return TokenRows(np.concatenate([p.input_ids for p in parts]),
                         np.concatenate([p.labels for p in parts]), offsets, pos,
                         {name: np.concatenate([p.extra[name] for p in parts])
                          for name in parts[0].extra})

    # ------------------------------------------------------------------------------ on disk
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "input_ids.npy", self.input_ids)
        np.save(folder / "labels.npy", self.labels)
        np.save(folder / "offsets.npy", self.offsets)
        if self.position_ids is not None:
            np.save(folder / "position_ids.npy", self.position_ids)
        for name, column in self.extra.items():
            np.save(folder / f"extra.{name}.npy", column)

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> TokenRows:
        mode = "r" if mmap else None
        pos_file = folder / "position_ids.npy"
        extra = {path.name[len("extra."):-len(".npy")]: np.load(path, mmap_mode=mode)
                 for path in sorted(folder.glob("extra.*.npy"))}
        return cls(np.load(folder / "input_ids.npy", mmap_mode=mode),
                   np.load(folder / "labels.npy", mmap_mode=mode),
                   np.load(folder / "offsets.npy"),
                   np.load(pos_file, mmap_mode=mode) if pos_file.exists() else None, extra)


def ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised: (sum(e - s),) integers, int32
    where they fit (half the memory traffic of int64, 3x faster here), else int64."""
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    dtype = np.int32 if max(total, int(ends.max(initial=0))) < 2**31 else np.int64
    heads = np.zeros(len(lengths), dtype=np.int64)  # where each run starts in the output
    np.cumsum(lengths[:-1], out=heads[1:])
    shift = (starts.astype(np.int64) - heads).astype(dtype)
    return np.arange(total, dtype=dtype) + np.repeat(shift, lengths)


def restarting_positions(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each length, concatenated: position ids of documents laid end to end (int32)."""
    return ranges(np.zeros_like(lengths), lengths).astype(np.int32, copy=False)
