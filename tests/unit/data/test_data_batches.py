"""BatchPlan (deterministic, resumable, length-grouped) and the collator's tensors."""

from __future__ import annotations

import numpy as np
import torch
from helpers_data import IGNORE

from strop.data.batches import BatchPlan, Collator, MaskedLM, batch_generator
from strop.data.rows import TokenRows


def _rows(lengths):
    ids = [list(range(10, 10 + n)) for n in lengths]
    return TokenRows.from_lists(ids, [[IGNORE] + r[1:] for r in ids])


def test_plan_is_a_function_of_seed_and_epoch():
    rows = _rows(np.arange(1, 24))
    plan = BatchPlan(rows, 4, seed=7)
    assert len(plan) == 6  # 23 rows, the last batch has 3
    first = plan.epoch(0)
    assert sorted(np.concatenate(first).tolist()) == list(range(23))
    assert [b.tolist() for b in first] == [b.tolist() for b in BatchPlan(rows, 4, seed=7).epoch(0)]
    assert [b.tolist() for b in plan.epoch(1)] != [b.tolist() for b in first]
    assert [b.tolist() for b in BatchPlan(rows, 4, seed=8).epoch(0)] != [b.tolist() for b in first]
    # A run resumed after 2 micro-batches sees exactly the rest of the epoch.
    assert [b.tolist() for b in plan.batches(0, skip=2)] == [b.tolist() for b in first[2:]]
    assert len(BatchPlan(rows, 4, seed=7, drop_last=True)) == 5


def test_group_by_length_batches_similar_lengths_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, 400)
    rows = _rows(lengths)
    grouped = BatchPlan(rows, 8, seed=1, group_by_length=True).epoch(0)
    plain = BatchPlan(rows, 8, seed=1).epoch(0)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(400))

    def waste(batches):  # padding slots when padding to the longest of each batch
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    assert waste(grouped) < waste(plain) / 3
    assert int(lengths[grouped[0]].max()) == int(lengths.max())


def test_unpacked_collation_pads_right_with_a_mask():
    rows = _rows([3, 5])
    batch = Collator(pad_id=0)([rows[0], rows[1]])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, 11, 12, IGNORE, IGNORE]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    fixed = Collator(pad_id=0, pad_to=8)([rows[0]])
    assert fixed["input_ids"].shape == (1, 8)


def test_packed_collation_has_positions_and_no_mask():
    row = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, 6, IGNORE, 8], "position_ids": [0, 1, 0, 1]}
    short = {"input_ids": [9, 9], "labels": [IGNORE, 9], "position_ids": [0, 1]}
    batch = Collator(pad_id=0)([row, short])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["labels"][1].tolist() == [IGNORE, 9, IGNORE, IGNORE]


def test_masked_lm_masks_15_percent_80_10_10():
    special = [0, 1, 2, 3]
    mlm = MaskedLM(mask_id=3, vocab_size=500, special_ids=special)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 500, (64, 256))
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP] are never chosen
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    collate = Collator(pad_id=0, mlm=mlm)
    batch = collate(rows, generator=batch_generator(42, 0, 0))
    chosen = batch["labels"] != IGNORE
    original = torch.from_numpy(ids)
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    share = chosen.float().mean().item()
    assert 0.13 < share < 0.17
    assert torch.equal(batch["labels"][chosen], original[chosen])
    masked = (batch["input_ids"] == 3) & chosen
    kept = (batch["input_ids"] == original) & chosen
    assert 0.75 < masked.sum().item() / chosen.sum().item() < 0.85
    assert 0.07 < kept.sum().item() / chosen.sum().item() < 0.13
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert batch["attention_mask"].all()
    again = collate(rows, generator=batch_generator(42, 0, 0))
    assert torch.equal(again["input_ids"], batch["input_ids"])  # same batch, same masking
