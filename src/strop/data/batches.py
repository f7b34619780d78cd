"""Micro-batches: which rows go together (BatchPlan) and how they become tensors (Collator).

A plan is a pure function of (seed, epoch): a resumed run asks for epoch e's batches and skips
the first k, and sees exactly what the interrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from strop.data.rows import IGNORE, TokenRows

# group_by_length sorts within windows of this many micro-batches, so batches are of similar
# length but the epoch is still shuffled (as transformers' LengthGroupedSampler does).
GROUP_WINDOW = 50


def _lengths(rows: Sequence[Any]) -> np.ndarray:
    if isinstance(rows, TokenRows):
        return rows.lengths
    return np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))


class BatchPlan:
    """Row indices of each micro-batch of an epoch, shuffled deterministically.

    len(plan) is the number of micro-batches per epoch (the last one may be smaller unless
    drop_last). With group_by_length, rows of similar length share a batch and the batch holding
    the longest row comes first, so an out-of-memory shows up at the first step.
    """

    def __init__(self, rows: Sequence[Any], micro_batch_size: int, seed: int, *,
                 shuffle: bool = True, group_by_length: bool = False, drop_last: bool = False):
        if micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        self.lengths = _lengths(rows)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.drop_last = drop_last

    def __len__(self) -> int:
        n, b = len(self.lengths), self.micro_batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The micro-batches (arrays of row indices) of epoch `epoch` (0-based)."""
        n, b = len(self.lengths), self.micro_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            window = b * GROUP_WINDOW
            chunks = [order[i:i + window] for i in range(0, n, window)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]) \
                if chunks else order
        batches = [order[i:i + b] for i in range(0, n, b)]
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        if self.group_by_length and len(batches) > 1:
            shuffled = [batches[i] for i in rng.permutation(len(batches))]
            longest = max(range(len(shuffled)), key=lambda i: int(self.lengths[shuffled[i]].max()))
            shuffled.insert(0, shuffled.pop(longest))
            batches = shuffled
        return batches

    def batches(self, epoch: int, skip: int = 0) -> Iterator[np.ndarray]:
        """Epoch `epoch`'s micro-batches from number `skip` on (to resume mid-epoch)."""
        yield from self.epoch(epoch)[skip:]


def batch_generator(seed: int, epoch: int, index: int):
    """A torch.Generator for one micro-batch's random choices (masked LM), so a resumed run
    masks the same tokens."""
    import torch

    mixed = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


class MaskedLM:
    """BERT's masking: 15% of the real tokens chosen; of those 80% [MASK], 10% a random token,
    10% kept. Labels hold the original id at chosen positions and -100 elsewhere."""

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                 probability: float = 0.15):
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special_ids = sorted(set(special_ids))
        self.probability = probability

    def __call__(self, input_ids, attention_mask, generator=None):
        import torch

        labels = input_ids.clone()  # (B, T)
        candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(self.special_ids))
        chosen = (torch.rand(input_ids.shape, generator=generator) < self.probability) & candidates
        labels[~chosen] = IGNORE
        roll = torch.rand(input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[chosen & (roll < 0.8)] = self.mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = torch.randint(self.vocab_size, input_ids.shape, generator=generator)[swap]
        return masked, labels


_MODEL_COLUMNS = {"input_ids", "labels", "position_ids"}


class Collator:
    """Rows -> a dict of (B, T) int64 tensors, right-padded.

    unpacked: input_ids, labels, attention_mask (1 = token, 0 = padding);
    packed (rows with position_ids): input_ids, labels, position_ids and no attention_mask, so
    the model builds the block-diagonal mask from the positions (padding continues as its own
    short "document" starting at position 0, with labels -100);
    masked LM: input_ids (masked), labels (original ids at the chosen positions), attention_mask.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, mlm: MaskedLM | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.mlm = mlm

    def __call__(self, rows: Sequence[dict[str, Any]], generator=None) -> dict[str, Any]:
        import torch

        lengths = [len(r["input_ids"]) for r in rows]
        width = max(max(lengths), self.pad_to or 0)
        batch = len(rows)
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        labels = np.full((batch, width), IGNORE, dtype=np.int64)
        packed = "position_ids" in rows[0]
        positions = np.zeros((batch, width), dtype=np.int64) if packed else None
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            ids[i, :n] = row["input_ids"]
            labels[i, :n] = row["labels"]
            mask[i, :n] = 1
            if positions is not None:
                positions[i, :n] = row["position_ids"]
                positions[i, n:] = np.arange(width - n)
        out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        for name in rows[0].keys() - _MODEL_COLUMNS:  # extra columns, zero where padded
            column = np.zeros((batch, width), dtype=np.asarray(rows[0][name]).dtype)
            for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
                column[i, :n] = row[name]
            out[name] = torch.from_numpy(column)
        if self.mlm is not None:
            out["input_ids"], out["labels"] = self.mlm(out["input_ids"], torch.from_numpy(mask),
                                                       generator)
            out["attention_mask"] = torch.from_numpy(mask)
        elif positions is not None:
            out["position_ids"] = torch.from_numpy(positions)
        else:
            out["attention_mask"] = torch.from_numpy(mask)
        return out


def make_collator(cfg, tokenizer) -> Collator:
    """The collator a config asks for: padding, pad_to_sequence_len, masked LM."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    mlm = None
    if cfg.objective == "masked_lm":
        if tokenizer.mask_token_id is None:
            from strop.errors import StropError

            raise StropError("objective: masked_lm needs a tokenizer with a mask token; set "
                             "special_tokens: {mask_token: '[MASK]'} or train a wordpiece "
                             "tokenizer (pretrain_tokenizer: {type: wordpiece})")
        mlm = MaskedLM(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids)
    return Collator(pad_id, cfg.row_len if cfg.pads_to_sequence_len else None, mlm)
