"""Preference losses: strop's against TRL 1.16's on the same model, ids and hyperparameters, and
the properties the loop relies on (packing and micro-batch splits do not change the loss).

TRL's side is tests/trl_reference.py (its trainers' own loss on one batch of every example).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from strop.data.batches import Collator
from strop.data.preference import CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE
from strop.data.rows import IGNORE, TokenRows, restarting_positions
from strop.train.forward import LossModel
from strop.train.loss import OutputHead, reference_token_logprobs, token_logprobs
from strop.train.preference import Objective, PreferenceLossModel

EOS, PAD = 1, 0
TEXTS = [("what is up?", "all good.", "no"), ("hi", "hello there!", "go away now please"),
         ("sky colour? ", "blue", "green and red"), ("count", "one two three.", "x")]
CHARS = "abcdefghijklmnopqrstuvwxyz ?.!"


def _ids(text: str) -> list[int]:
    return [CHARS.index(c) + 2 for c in text]


PAIRS = [{"prompt_ids": _ids(p), "chosen_ids": _ids(c) + [EOS], "rejected_ids": _ids(r) + [EOS]}
         for p, c, r in TEXTS]


@pytest.fixture(scope="module")
def models():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    policy = LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in policy.lm_head.parameters():  # a frozen head, as under LoRA: the fused path
        p.requires_grad_(False)
    return policy, reference


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def _rows(examples: list[tuple[list[int], list[int], int]]) -> TokenRows:
    """One row per example of two documents: (prompt, response, side) each, as
    strop.data.preference lays them out (the response scored, the prompt not)."""
    ids, labels, sides, doc_lengths = [], [], [], []
    for k in range(0, len(examples), 2):
        for prompt, response, side in examples[k:k + 2]:
            ids += prompt + response
            labels += [IGNORE] * len(prompt) + response
            sides += [side] * (len(prompt) + len(response))
            doc_lengths.append(len(prompt) + len(response))
    lengths = np.asarray(doc_lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1, 2).sum(1))])
    return TokenRows(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32),
                     offsets, restarting_positions(lengths), {"side": np.asarray(sides, np.int8)})


def _pair_rows(pairs=PAIRS) -> TokenRows:
    return _rows([x for p in pairs for x in ((p["prompt_ids"], p["chosen_ids"], CHOSEN),
                                             (p["prompt_ids"], p["rejected_ids"], REJECTED))])


def _kto_rows(examples) -> TokenRows:
    out = []
    for i, e in enumerate(examples):  # the KL document: the previous example's completion
        out += [(e["prompt_ids"], e["completion_ids"], DESIRABLE if e["label"] else UNDESIRABLE),
                (e["prompt_ids"], examples[i - 1]["completion_ids"], KL)]
    return _rows(out)


def _scorer(model, objective: Objective, precomputed: bool = True) -> PreferenceLossModel:
    base = LossModel.of(model, "causal_lm")
    return PreferenceLossModel(model, base.decoder, base.head, objective, precomputed)


def _batch(rows: TokenRows, reference, objective: Objective, groups=None) -> list[dict]:
    """Collated micro-batches (`groups` of row indices; default one holding every row), each
    with the reference model's log-probs as the precomputed column."""
    groups = groups or [list(range(len(rows)))]
    batches = []
    for group in groups:
        batch = Collator(PAD)([rows.arrays(i) for i in group])
        with torch.no_grad():
            batch["ref_logps"] = _scorer(reference, objective).token_logprobs(batch)
        batches.append(batch)
    return batches


def _strop_loss(policy, reference, rows, objective: Objective, groups=None):
    """The loss as the loop computes it over a window of micro-batches, and its metrics."""
    batches = _batch(rows, reference, objective, groups)
    scorer = _scorer(policy, objective)
    counts, totals, metrics = {}, {}, {}
    for batch in batches:
        for unit, n in scorer.counts(batch).items():
            counts[unit] = counts.get(unit, 0) + n
    loss = 0.0
    for batch in batches:
        sums, batch_metrics = scorer.parts(batch)
        for unit, value in sums.items():
            loss = loss + value / counts[unit]
            totals[unit] = totals.get(unit, 0.0) + float(value.detach())
        for name, (value, n) in batch_metrics.items():
            had = metrics.get(name, (0.0, 0.0))
            metrics[name] = (had[0] + float(value), had[1] + float(n))
    return loss, {k: v / n for k, (v, n) in metrics.items() if n}, totals


def _close(ours: float, theirs: float, rel: float = 1e-5) -> None:
    assert abs(ours - theirs) <= rel * max(1.0, abs(theirs)), (ours, theirs)


# --------------------------------------------------------------------------- TRL parity

CASES = [
    ("dpo", Objective("dpo", beta=0.1), {"beta": 0.1}),
    ("dpo+rpo", Objective("dpo", beta=0.1, rpo_alpha=0.7), {"beta": 0.1, "rpo_alpha": 0.7}),
    ("ipo", Objective("ipo", beta=0.1), {"beta": 0.1}),
    ("simpo", Objective("simpo", beta=2.0, simpo_gamma=0.8), {"beta": 2.0, "simpo_gamma": 0.8,
                                                              "cpo_alpha": 0.0}),
    ("simpo+nll", Objective("simpo", beta=2.0, simpo_gamma=0.8, cpo_alpha=0.5),
     {"beta": 2.0, "simpo_gamma": 0.8, "cpo_alpha": 0.5}),
]


@pytest.mark.parametrize("name,objective,hp", CASES, ids=[c[0] for c in CASES])
def test_pair_losses_equal_trl(models, tokenizer, name, objective, hp):
    trl_reference = pytest.importorskip("tests.trl_reference")
    policy, reference = models
    ours, metrics, _ = _strop_loss(policy, reference, _pair_rows(), objective)
    uses_ref = objective.uses_reference
    theirs = trl_reference.trl_pair_loss(objective.name, policy, tokenizer, PAIRS,
                                         **({"ref_model": reference} if uses_ref else {}), **hp)
    _close(float(ours), theirs["loss"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        _close(metrics[key], theirs[key])


def test_orpo_equals_trl_but_for_the_prompt_in_its_nll(models, tokenizer):
    """TRL's ORPO takes its NLL over the chosen sequence *with* its prompt; strop's over the
    chosen response, as SFT does (only responses are scored). The odds-ratio term, the rewards
    and the log-odds are TRL's."""
    trl_reference = pytest.importorskip("tests.trl_reference")
    policy, reference = models
    objective = Objective("orpo", beta=0.1, orpo_alpha=0.25)
    ours, metrics, totals = _strop_loss(policy, reference, _pair_rows(), objective)
    theirs = trl_reference.trl_pair_loss("orpo", policy, tokenizer, PAIRS, beta=0.25)
    odds_term = float(ours) - metrics["nll_loss"]
    _close(odds_term, theirs["loss"] - theirs["nll_loss"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected"):
        _close(metrics[key], theirs[key])
    chosen_tokens = sum(len(p["chosen_ids"]) for p in PAIRS)
    _close(metrics["nll_loss"], totals["nll"] / chosen_tokens)  # the responses' token mean
    assert metrics["nll_loss"] != pytest.approx(theirs["nll_loss"])  # the documented difference


def test_kto_equals_trl(models, tokenizer):
    trl_reference = pytest.importorskip("tests.trl_reference")
    policy, reference = models
    examples = [{"prompt_ids": p["prompt_ids"], "label": label,
                 "completion_ids": p["chosen_ids"] if label else p["rejected_ids"]}
                for p, label in zip(PAIRS, [True, False, True, True], strict=True)]
    objective = Objective("kto", beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    hp = {"beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 1.5}
    # both ways round, so that one of them has a KL estimate above the clamp at 0
    for pol, ref in ((policy, reference), (reference, policy)):
        ours, metrics, _ = _strop_loss(pol, ref, _kto_rows(examples), objective)
        theirs = trl_reference.trl_kto_loss(pol, tokenizer, examples, ref_model=ref, **hp)
        _close(float(ours), theirs["loss"])
        _close(metrics["kl"], theirs["kl"], rel=1e-4)  # differences of ~50-nat float32 sums
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            _close(metrics[key], theirs[key])


# ------------------------------------------------------------------------- loop properties


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "simpo"])
def test_packing_and_micro_batches_do_not_change_the_loss(models, name):
    """Pairs packed into one row (kept apart by position ids), or spread over micro-batches of
    an accumulation window, give the loss and gradients of one batch of separate rows."""
    from strop.data.packing import pack

    policy, reference = models
    objective = Objective(name, beta=0.5, rpo_alpha=0.3 if name == "dpo" else None)
    rows = _pair_rows()
    results = []
    for layout, groups in (("rows", None), ("packed", None), ("split", [[0], [1, 2], [3]])):
        laid = pack(rows, 200) if layout == "packed" else rows
        if layout == "packed":
            assert len(laid) == 1
        policy.zero_grad(set_to_none=True)
        loss, metrics, _ = _strop_loss(policy, reference, laid, objective, groups)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results.append((float(loss), metrics["rewards/accuracies"], grads))
    for loss, accuracy, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5, abs=1e-6)
        assert accuracy == results[0][1]
        torch.testing.assert_close(grads, results[0][2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head_trains", [False, True])
def test_token_logprobs_and_gradients_equal_full_logits(head_trains):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(head_trains)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE
    labels[1, 5] = IGNORE
    weights = torch.randn(2, 7)
    ours = token_logprobs(hidden, labels, OutputHead(head), chunk_rows=3)
    (ours * weights).sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference = reference_token_logprobs(head(hidden), labels)
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-5, atol=1e-6)
    assert (ours[labels == IGNORE] == 0).all()


def test_reference_from_the_disabled_adapter_equals_the_base_model(models):
    """Under LoRA the reference is the same model with its adapter off: no second copy."""
    from peft import LoraConfig, get_peft_model

    policy, _ = models
    base = copy.deepcopy(policy)
    peft_model = get_peft_model(copy.deepcopy(policy), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    objective = Objective("dpo", beta=0.1)
    batch = Collator(PAD)([_pair_rows().arrays(i) for i in range(len(PAIRS))])
    live = _scorer(peft_model, objective, precomputed=False)
    torch.testing.assert_close(live.reference_logprobs(batch),
                               _scorer(base, objective).token_logprobs(batch))
    assert not torch.allclose(live.token_logprobs(batch), live.reference_logprobs(batch))


def _documents(pairs=PAIRS) -> tuple[TokenRows, np.ndarray]:
    """Each side a whole document (prompt + response), two per pair, and their sides."""
    ids, labels = [], []
    for p in pairs:
        for key in ("chosen_ids", "rejected_ids"):
            ids.append(p["prompt_ids"] + p[key])
            labels.append([IGNORE] * len(p["prompt_ids"]) + p[key])
    return TokenRows.from_lists(ids, labels), np.array([CHOSEN, REJECTED] * len(pairs), np.int8)


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "simpo"])
def test_a_shared_prompt_gives_the_loss_and_gradients_of_whole_documents(models, name):
    """Prompt, chosen, rejected in one row (the rejected a branch that attends to the prompt,
    not to the chosen response) is the same computation as the two whole documents, with the
    prompt computed once, and packs like any row."""
    from strop.data.packing import pack
    from strop.data.preference import _shared
    from strop.model.attention import varlen_attention

    policy, reference = models
    objective = Objective(name, beta=0.5, rpo_alpha=0.3 if name == "dpo" else None)
    shared = _shared(*_documents())
    assert shared.num_tokens == _pair_rows().num_tokens - sum(len(p["prompt_ids"]) for p in PAIRS)
    results = []
    with varlen_attention(policy), varlen_attention(reference):
        for rows in (_pair_rows(), shared, pack(shared, 200)):
            policy.zero_grad(set_to_none=True)
            loss, metrics, _ = _strop_loss(policy, reference, rows, objective)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in policy.parameters()
                               if p.grad is not None])
            results.append((float(loss.detach()), metrics, grads))
    for loss, metrics, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert metrics[key] == pytest.approx(results[0][1][key], rel=1e-4, abs=1e-6)
        torch.testing.assert_close(grads, results[0][2], rtol=1e-4, atol=1e-6)


def test_branch_attention_equals_the_whole_second_document():
    """Attention of a branch (positions going back to p > 0) sees its document's first p
    tokens and itself: the outputs of running the second document whole."""
    from strop.model.attention import varlen_sdpa_forward

    torch.manual_seed(0)
    prompt, first, second = 3, 4, 2
    q, k, v = (torch.randn(1, 2, prompt + second, 8) for _ in range(3))
    whole, _ = varlen_sdpa_forward(None, q, k, v, None)  # causal over prompt + second
    extra = [torch.randn(1, 2, first, 8) for _ in range(3)]
    branched = [torch.cat([t[:, :, :prompt], e, t[:, :, prompt:]], dim=2)
                for t, e in zip((q, k, v), extra, strict=True)]
    positions = torch.tensor([list(range(prompt + first)) + list(range(prompt, prompt + second))])
    out, _ = varlen_sdpa_forward(None, *branched, None, position_ids=positions)
    torch.testing.assert_close(out[:, :prompt], whole[:, :prompt])
    torch.testing.assert_close(out[:, prompt + first:], whole[:, prompt:])
