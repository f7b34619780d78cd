"""The loss: fused chunked head + CE equals the plain full-logits definition, values and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from strop.train.loss import (
    IGNORE,
    OutputHead,
    count_trained_tokens,
    lm_loss_sum,
    reference_loss_sum,
)


def _case(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(16, 37, bias=bias).double()
    labels = torch.randint(0, 37, (3, 11))
    labels[0, :4] = IGNORE  # a masked prompt
    labels[2, 7:] = IGNORE  # padding
    return hidden, head, labels


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_fused_head_matches_full_logits_loss_and_gradients(bias, chunk_rows):
    hidden, head, labels = _case(bias)
    want = reference_loss_sum(head(hidden), labels)
    want.backward()
    want_grads = [hidden.grad.clone(), head.weight.grad.clone()] + \
        ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()

    got, n = lm_loss_sum(hidden, labels, OutputHead(head), chunk_rows=chunk_rows)
    got.backward()
    got_grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    assert n == count_trained_tokens(labels) == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient():
    hidden, head, labels = _case(bias=False)
    head.weight.requires_grad_(False)
    loss, _ = lm_loss_sum(hidden, labels, OutputHead(head))
    loss.backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_generic_head_path_matches_reference():
    hidden, head, labels = _case(bias=True)
    wrapped = nn.Sequential(nn.Identity(), head)  # not a plain Linear: the checkpointed path
    want = reference_loss_sum(wrapped(hidden), labels)
    got, _ = lm_loss_sum(hidden, labels, OutputHead(wrapped), chunk_rows=4)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    (g_want,) = torch.autograd.grad(want, hidden)
    (g_got,) = torch.autograd.grad(lm_loss_sum(hidden, labels, OutputHead(wrapped), chunk_rows=4)[0],
                                   hidden)
    torch.testing.assert_close(g_got, g_want)


def test_softcap_uses_the_generic_path_and_applies_the_cap():
    hidden, head, labels = _case(bias=False)
    capped = OutputHead(head, softcap=2.0)
    assert capped.linear() is None
    logits = torch.tanh(head(hidden) / 2.0) * 2.0
    torch.testing.assert_close(lm_loss_sum(hidden, labels, capped)[0].double(),
                               reference_loss_sum(logits, labels))


def test_masked_lm_positions_are_not_shifted():
    hidden, head, labels = _case(bias=False)
    got, n = lm_loss_sum(hidden, labels, OutputHead(head), shift=False)
    assert n == int((labels != IGNORE).sum())
    torch.testing.assert_close(got.double(), reference_loss_sum(head(hidden), labels, shift=False))


def test_no_trained_tokens_gives_zero_loss_with_a_graph():
    hidden, head, labels = _case(bias=False)
    loss, n = lm_loss_sum(hidden, torch.full_like(labels, IGNORE), OutputHead(head))
    assert n == 0 and loss.item() == 0.0
    loss.backward()


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 64, 32)
    head = nn.Linear(32, 300)
    labels = torch.randint(0, 300, (2, 64))
    want = reference_loss_sum(head(hidden), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = lm_loss_sum(hidden, labels, OutputHead(head))
    assert abs(got.item() - want.item()) / want.item() < 2e-2
