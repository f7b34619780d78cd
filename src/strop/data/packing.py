"""Packing rows into sequence_len rows, and pretraining text into sequence_len blocks.

Packing (`sample_packing`) is best-fit decreasing: longest rows first, each into the fullest
row that still has room. Position ids restart at 0 for each document, which is what keeps
documents apart: the model builds a block-diagonal causal mask from them.

Blocks (pretraining text without packing) are the documents laid end to end, each ending with
EOS, and cut every sequence_len tokens: no padding, every token trained, documents separated by
EOS as in GPT-style pretraining.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

from strop.data.rows import TokenRows, ranges, restarting_positions


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of row indices) of total length <= capacity; deterministic.

    Free space is kept as a sorted list of distinct values (at most capacity + 1 of them), so
    finding the tightest bin that fits is a bisect, not a scan over all bins.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    bins: list[list[int]] = []
    free_values: list[int] = []            # sorted distinct free space of open bins
    with_free: dict[int, list[int]] = {}   # free space -> open bins with exactly that much
    for index in order.tolist():
        need = int(lengths[index])
        if need > capacity:
            raise ValueError(f"row {index} has {need} tokens, more than the bin ({capacity})")
        k = bisect_left(free_values, need)
        if k == len(free_values):
            target = len(bins)
            bins.append([])
            left = capacity - need
        else:
            space = free_values[k]
            holders = with_free[space]
            target = holders.pop()
            if not holders:
                del with_free[space]
                free_values.pop(k)
            left = space - need
        bins[target].append(index)
        if left > 0:
            if left not in with_free:
                with_free[left] = []
                insort(free_values, left)
            with_free[left].append(target)
    return bins


def pack(rows: TokenRows, sequence_len: int) -> TokenRows:
    """Rows packed into sequence_len rows with per-document position ids."""
    if not len(rows):
        return TokenRows.empty(packed=True)
    lengths = rows.lengths
    bins = best_fit_decreasing(lengths, sequence_len)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(rows))
    gather = ranges(rows.offsets[order], rows.offsets[order + 1])
    bin_lengths = np.fromiter((int(lengths[b].sum()) for b in bins), dtype=np.int64, count=len(bins))
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(bin_lengths, out=offsets[1:])
    # Rows that already hold several documents (a preference pair) keep their own positions.
    positions = rows.position_ids[gather] if rows.packed else restarting_positions(lengths[order])
    return TokenRows(rows.input_ids[gather], rows.labels[gather], offsets, positions,
                     {name: column[gather] for name, column in rows.extra.items()})


def split_long(rows: TokenRows, sequence_len: int) -> TokenRows:
    """Documents longer than sequence_len cut into sequence_len pieces (pretraining text that is
    packed: nothing is lost). The first token of each piece is not trained."""
    lengths = rows.lengths
    if not len(rows) or lengths.max() <= sequence_len:
        return rows
    pieces = (lengths + sequence_len - 1) // sequence_len
    starts = np.repeat(rows.offsets[:-1], pieces) + sequence_len * (
        np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces))
    ends = np.minimum(starts + sequence_len, np.repeat(rows.offsets[1:], pieces))
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=offsets[1:])
    gather = ranges(starts, ends)
    labels = rows.labels[gather]  # a copy (fancy indexing)
    labels[offsets[:-1]] = -100
    return TokenRows(rows.input_ids[gather], labels, offsets)


def blocks(rows: TokenRows, sequence_len: int) -> TokenRows:
    """Documents end to end, cut into sequence_len blocks; every token trained."""
    total = rows.num_tokens
    if total == 0:
        return TokenRows.empty()
    ids = np.asarray(rows.input_ids)
    count = (total + sequence_len - 1) // sequence_len
    offsets = np.minimum(np.arange(count + 1, dtype=np.int64) * sequence_len, total)
    return TokenRows(np.array(ids, dtype=np.int32), np.array(ids, dtype=np.int32), offsets)


def efficiency(rows: TokenRows, sequence_len: int) -> float:
    """Real tokens / token slots (rows x sequence_len)."""
    return rows.num_tokens / (len(rows) * sequence_len) if len(rows) else 0.0
