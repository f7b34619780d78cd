"""Optimizer registry and parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from strop.config import load_dict
from strop.config.schema import Optimizer
from strop.train.optim import OPTIMIZERS, build_optimizer, param_groups

BASE = {"base_model": "m", "learning_rate": 1e-3, "datasets": [{"path": "d", "type": "alpaca"}]}


def cfg(**kw):
    return load_dict({**BASE, **kw}).cfg


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.input_layernorm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_every_configured_optimizer_name_is_registered():
    assert set(Optimizer.__args__) == set(OPTIMIZERS)


def test_no_weight_decay_on_biases_and_norms():
    groups = {g.name: g for g in param_groups(Tiny(), cfg(weight_decay=0.1))}
    decayed = {id(p) for p in groups["decay"].params}
    model_params = dict(Tiny().named_parameters())
    assert groups["decay"].weight_decay == 0.1 and groups["no_decay"].weight_decay == 0.0
    assert len(groups["decay"].params) == 2  # embed.weight, proj.weight
    assert len(groups["no_decay"].params) == 3  # proj.bias, norm weight and bias
    assert len(decayed) == 2 and "frozen.weight" in model_params  # frozen ones are left out


def test_loraplus_gives_b_matrices_a_larger_learning_rate():
    class Lora(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Linear(4, 2, bias=False)
            self.lora_B = nn.Linear(2, 4, bias=False)

    groups = param_groups(Lora(), cfg(adapter="lora", lora_target_linear=True,
                                      loraplus_lr_ratio=16))
    lrs = {g.name: g.lr for g in groups}
    assert lrs == {"no_decay": 1e-3, "no_decay_lora_B": pytest.approx(16e-3)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_takes_a_step_on_cpu(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    x = torch.randn(8, 64)
    opt = build_optimizer(model, cfg(optimizer=name, **({"sgd_momentum": 0.9} if name == "sgd"
                                                         else {})), "cpu")
    before = model(x).pow(2).mean()
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert model(x).pow(2).mean() < before


def test_nothing_trainable_is_a_clear_error():
    from strop.errors import StropError

    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(StropError, match="nothing to train"):
        build_optimizer(model, cfg(), "cpu")
