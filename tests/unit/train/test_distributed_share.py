"""How one optimizer step's micro-batches are dealt out to the ranks (strop.train.distributed)."""

from __future__ import annotations

import pytest

from strop.train.distributed import World, share


@pytest.mark.parametrize("size, n", [(2, 4), (2, 3), (3, 7), (4, 1), (1, 5)])
def test_every_micro_batch_goes_to_exactly_one_rank_and_shares_are_even(size, n):
    window = list(range(n))
    shares = [share(World(rank, size, rank, "ddp"), window) for rank in range(size)]
    assert len({len(s) for s in shares}) == 1  # every rank runs as many passes
    real = sorted(x for s in shares for x in s if x is not None)
    assert real == window  # disjoint, and together the whole step
    assert all(s[0] is not None or n < size for s in shares)


def test_a_short_share_is_padded_at_its_end():
    assert share(World(1, 2, 1, "ddp"), ["a", "b", "c"]) == ["b", None]
    assert share(World(0, 2, 0, "ddp"), ["a", "b", "c"]) == ["a", "c"]
