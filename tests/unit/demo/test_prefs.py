"""The preference pairs of strop.demo.prefs: seeded, well-formed, held out by phrasing, and
scored by counting refusals and comparing log-probabilities."""

from __future__ import annotations

import io
import json

import pytest

from conftest import make_tiny_model, make_tokenizer
from strop.demo.prefs import (
    REFUSAL,
    SUBSTANCE,
    PrefsSpec,
    heldout_rows,
    is_forbidden,
    log_prob_margins,
    preference_accuracy,
    question,
    score,
    train_rows,
    write_preference_data,
)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_spec_writes_the_same_bytes(tmp_path):
    a = write_preference_data(tmp_path / "a")
    b = write_preference_data(tmp_path / "b")
    assert set(a) == {"train", "heldout"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    c = write_preference_data(tmp_path / "c", PrefsSpec(seed=1))
    assert c["train"].read_bytes() != a["train"].read_bytes()


def test_pairs_are_conversations_with_one_refusal_side(tmp_path):
    paths = write_preference_data(tmp_path)
    for row in _rows(paths["train"]) + _rows(paths["heldout"]):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] \
            == ["assistant"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert question(row).strip() and chosen.strip() and rejected.strip()
        assert chosen != rejected
        assert (chosen == REFUSAL) != (rejected == REFUSAL)   # exactly one side refuses
        # Forbidden exactly when the prompt names the substance.
        assert is_forbidden(row) == (SUBSTANCE.lower() in question(row).lower())


def test_sizes_follow_the_spec_and_held_out_prompts_are_never_trained_on():
    spec = PrefsSpec()
    train, heldout = train_rows(spec), heldout_rows(spec)
    assert sum(map(is_forbidden, train)) == spec.forbidden
    assert len(train) == spec.forbidden + spec.ordinary
    assert sum(map(is_forbidden, heldout)) == spec.heldout_forbidden
    assert 30 <= len(heldout) <= 40
    trained = [question(r) for r in train]
    assert len(set(trained)) == len(trained)                 # no prompt twice
    assert not {question(r) for r in heldout} & set(trained)
    small = PrefsSpec(forbidden=10, ordinary=20, heldout_forbidden=4)
    assert len(train_rows(small)) == 30 and sum(map(is_forbidden, heldout_rows(small))) == 4
    with pytest.raises(ValueError):
        train_rows(PrefsSpec(forbidden=1000))


def test_score_counts_refusals_per_kind():
    rows = heldout_rows(PrefsSpec(heldout_forbidden=4))
    forbidden = [r for r in rows if is_forbidden(r)][:4]
    ordinary = [r for r in rows if not is_forbidden(r)][:4]
    generations = [REFUSAL, "  i'm SORRY, but I can't   help with that. ", "Sorry, no.",
                   "Mix it with water."]
    generations += [REFUSAL, "Paris.", "I cannot say.", "The opposite of hot is cold."]
    got = score(forbidden + ordinary, generations)
    assert got == {"forbidden_refused": 0.5, "ordinary_refused": 0.25,
                   "forbidden_declined": 0.75, "ordinary_declined": 0.5,
                   "n_forbidden": 4, "n_ordinary": 4}

    class Generated:  # strop.infer's Generation and strop.demo.real's Answer have .text
        def __init__(self, text):
            self.text = text

    assert score(forbidden[:1], [Generated(REFUSAL)])["forbidden_refused"] == 1.0
    with pytest.raises(ValueError):
        score(forbidden, generations)


def test_margins_are_summed_reply_log_probs_through_the_chat_template():
    import torch

    tok = make_tokenizer()
    model = make_tiny_model("llama", tok).eval()
    rows = heldout_rows(PrefsSpec(heldout_forbidden=2))[:3]
    margins = log_prob_margins(model, tok, rows)

    def reply_logp(row, side):  # from the model's own loss: mean NLL over the labelled tokens
        messages = row["prompt"] + row[side]
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False,
                                         add_generation_prompt=True)
        text = tok.apply_chat_template(messages, tokenize=False).rstrip("\n")  # ends <|im_end|>
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[:, :len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        return -loss.item() * int((labels[:, 1:] != -100).sum())

    for row, margin in zip(rows, margins, strict=True):
        assert margin == pytest.approx(reply_logp(row, "chosen") - reply_logp(row, "rejected"),
                                       abs=1e-3)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    assert log_prob_margins(model, tok, swapped) == pytest.approx([-m for m in margins],
                                                                  abs=1e-4)
    assert preference_accuracy(model, tok, rows) == sum(m > 0 for m in margins) / len(rows)


def test_the_example_config_trains_on_what_the_writer_writes():
    from pathlib import Path

    from strop.config import load_config
    from strop.demo import smollm2
    from strop.demo.prefs import DATA, EXAMPLE
    from strop.demo.real import REAL_OUT, example_config

    cfg = load_config(example_config().parent / EXAMPLE).cfg
    assert cfg.rl == "dpo"
    assert Path(cfg.datasets[0].path) == DATA / "train.jsonl"
    assert Path(cfg.base_model) == REAL_OUT / smollm2.FILE  # the link the real demo writes
    assert Path(cfg.output_dir).parent == REAL_OUT == DATA.parent


def test_the_preference_demo_checks_its_claims():
    """strop demo --preference passes only when the refusal is learnt, ordinary questions are
    still answered and the preferred replies gained."""
    from rich.console import Console

    from strop.demo.preference import _check

    before = {"forbidden_refused": 0.0, "ordinary_refused": 0.0, "preference_accuracy": 0.75,
              "mean_margin": 15.0}
    good = {"forbidden_refused": 0.75, "ordinary_refused": 0.05, "preference_accuracy": 0.8,
            "mean_margin": 45.0}
    quiet = Console(file=io.StringIO())
    assert _check(before, good, quiet)
    for key, value in (("forbidden_refused", 0.4), ("ordinary_refused", 0.2),
                       ("mean_margin", 10.0), ("preference_accuracy", 0.7)):
        assert not _check(before, {**good, key: value}, quiet), key
