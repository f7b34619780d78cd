"""Packing: bins, position ids, and documents that never see each other (logits and loss)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_data import IGNORE, bpe

from strop.data.batches import Collator
from strop.data.packing import best_fit_decreasing, blocks, efficiency, pack, split_long
from strop.data.rows import TokenRows


@pytest.fixture
def tok():
    return bpe()


@pytest.fixture(scope="module")
def llama():
    """One tiny random Llama for the module (eval mode: no dropout)."""
    from conftest import make_tiny_model

    return make_tiny_model("llama", bpe()).eval()


def test_best_fit_decreasing_known_example():
    # 5 opens bin 0; 4 opens bin 1; 3 fills bin 0 exactly (tightest fit); 3 goes to bin 1;
    # 2 opens bin 2; 1 fills bin 1 exactly.
    assert best_fit_decreasing(np.array([5, 4, 3, 3, 2, 1]), 8) == [[0, 2], [1, 3, 5], [4]]


def test_bins_hold_every_row_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 2000)
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert max(int(lengths[b].sum()) for b in bins) <= 128
    # BFD on many small items leaves little room: within a bin or so of the lower bound.
    assert len(bins) <= int(np.ceil(lengths.sum() / 128)) + 2


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 300, n).tolist() for n in lengths]
    labels = [[IGNORE] + r[1:] for r in ids]
    return TokenRows.from_lists(ids, labels), ids


def test_pack_keeps_every_token_and_restarts_positions():
    rows, ids = _rows([7, 3, 5, 2, 9])
    packed = pack(rows, 12)
    assert packed.packed and packed.num_tokens == rows.num_tokens
    assert all(len(r["input_ids"]) <= 12 for r in packed)
    docs = []
    for row in packed:
        pos = row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert pos == [i - max(s for s in starts if s <= i) for i in range(len(pos))]
        for a, b in zip(starts, [*starts[1:], len(pos)], strict=True):
            docs.append(row["input_ids"][a:b])
            assert row["labels"][a] == IGNORE  # nothing predicts a document's first token
    assert sorted(map(tuple, docs)) == sorted(map(tuple, ids))
    assert efficiency(packed, 12) == pytest.approx(26 / (len(packed) * 12))


def test_split_long_and_blocks():
    rows, ids = _rows([10, 3])
    cut = split_long(rows, 4)
    assert cut.lengths.tolist() == [4, 4, 2, 3]
    assert np.concatenate([r["input_ids"] for r in cut]).tolist() == ids[0] + ids[1]
    assert all(r["labels"][0] == IGNORE for r in cut)
    b = blocks(rows, 4)
    assert b.lengths.tolist() == [4, 4, 4, 1]
    assert all(r["labels"] == r["input_ids"] for r in b)  # every token trained


def test_packed_rows_match_separate_rows_on_a_tiny_llama(tok, llama):
    """Logits per document and the loss are the same packed or not: no cross-document attention."""
    import torch
    from transformers.masking_utils import find_packed_sequence_indices


    model = llama
    rows, _ = _rows([6, 9, 4, 7], seed=1)
    rows.labels[rows.offsets[1] + 2] = IGNORE  # a prompt token inside a document
    packed = pack(rows, 32)
    assert len(packed) == 1
    collate = Collator(pad_id=tok.pad_token_id)
    batch = collate([packed[0]])
    assert "attention_mask" not in batch
    # transformers reads the documents off the position ids: 4 documents, in packing order.
    seq_ids = find_packed_sequence_indices(batch["position_ids"])
    assert seq_ids.unique().numel() == 4
    with torch.no_grad():
        out_packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        positions = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
        ends = [*starts[1:], len(positions)]
        for a, b in zip(starts, ends, strict=True):
            alone = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits
            torch.testing.assert_close(out_packed.logits[:, a:b], alone, atol=1e-5, rtol=1e-4)

        unpacked = collate([rows[i] for i in range(len(rows))])
        assert unpacked["attention_mask"].sum() == rows.num_tokens
        loss_unpacked = model(**unpacked, use_cache=False).loss
        loss_packed = model(**batch, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_unpacked, atol=1e-5, rtol=1e-5)


def test_padding_a_packed_batch_keeps_rows_apart(tok, llama):
    import torch

    model = llama
    rows, _ = _rows([5, 4, 8], seed=2)
    packed = pack(rows, 9)  # two rows of different lengths: the shorter is padded
    collate = Collator(pad_id=tok.pad_token_id)
    batch = collate([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits
        for i in range(len(packed)):
            one = collate([packed[i]])
            alone = model(input_ids=one["input_ids"], position_ids=one["position_ids"],
                          use_cache=False).logits
            n = one["input_ids"].shape[1]
            torch.testing.assert_close(together[i:i + 1, :n], alone, atol=1e-5, rtol=1e-4)


def test_a_cache_defeats_the_packed_mask(llama):
    """Why packed batches need use_cache=False: transformers builds the block-diagonal mask from
    position_ids only without a cache, and Llama makes one by default (config.use_cache). When
    this test fails, transformers changed and the use_cache=False rule can go."""
    import torch

    model = llama
    ids = torch.arange(5, 15).unsqueeze(0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 5:], use_cache=False).logits
        isolated = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 5:]
        leaky = model(input_ids=ids, position_ids=positions).logits[:, 5:]
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_attended_length_is_the_token_weighted_document_length():
    import numpy as np

    from strop.data.rows import TokenRows

    ids = np.arange(10, dtype=np.int32)
    rows = TokenRows(ids, ids, np.array([0, 4, 10]))  # rows of 4 and 6 tokens
    assert rows.attended_length() == (4 * 4 + 6 * 6) / 10
    # One packed row of documents 2, 3 and 5 long: each attends only within itself.
    packed = TokenRows(ids, ids, np.array([0, 10]),
                       np.array([0, 1, 0, 1, 2, 0, 1, 2, 3, 4], dtype=np.int32))
    assert packed.attended_length() == (2 * 2 + 3 * 3 + 5 * 5) / 10
