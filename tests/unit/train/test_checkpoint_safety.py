"""A checkpoint is data: loading one runs no code, and a damaged one is a one-line error."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from strop.errors import StropError
from strop.train.checkpoint import load_state, rng_state, set_rng_state


class _Planted:
    """What an attacker puts in rng.pt: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_runs_nothing_and_is_one_line(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "rng.pt"
    with path.open("wb") as f:
        pickle.dump({"python": _Planted(marker)}, f)
    with pytest.raises(StropError) as err:
        load_state(path)
    assert not marker.exists()
    assert "never runs code" in str(err.value) and len(str(err.value).splitlines()) == 1
    # ... and the same through torch.save's own format.
    torch.save({"numpy": _Planted(marker)}, path)
    with pytest.raises(StropError):
        load_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_damaged_state_files_are_one_line(tmp_path, damage):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.ones(100)}}, "param_groups": []}, path)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(StropError) as err:
        load_state(path)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    want = (random.random(), np.random.random(), np.random.normal(), torch.rand(3))
    set_rng_state(load_state(path))
    got = (random.random(), np.random.random(), np.random.normal(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
