"""The made-up facts of `strop demo --real` (strop.demo.facts): seeded, split by phrasing, and in
the chat format the example config trains on."""

from __future__ import annotations

import json

from strop.demo.facts import (
    ANSWERS,
    CONTROLS,
    HELDOUT_FORMS,
    REHEARSAL,
    TRAIN_FORMS,
    FactsSpec,
    make_facts,
    question,
    write_facts_data,
)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_spec_writes_the_same_bytes(tmp_path):
    a = write_facts_data(tmp_path / "a", FactsSpec(provinces=5))
    b = write_facts_data(tmp_path / "b", FactsSpec(provinces=5))
    for x, y in ((a.train, b.train), (a.heldout, b.heldout), (a.controls, b.controls)):
        assert x.read_bytes() == y.read_bytes()
    c = write_facts_data(tmp_path / "c", FactsSpec(provinces=5, seed=1))
    assert c.train.read_bytes() != a.train.read_bytes()


def test_every_fact_is_trained_in_every_phrasing_and_asked_in_an_unseen_one(tmp_path):
    spec = FactsSpec(provinces=10)
    facts = make_facts(spec)
    assert len(facts) == 40 and len({(f.relation, f.subject) for f in facts}) == 40
    for relation in ANSWERS:  # values unique within a relation: one right answer per question
        values = [f.value for f in facts if f.relation == relation]
        assert len(set(values)) == len(values)
    paths = write_facts_data(tmp_path, spec)
    train, heldout = _rows(paths.train), _rows(paths.heldout)
    assert len(train) == sum(len(TRAIN_FORMS[f.relation]) for f in facts) \
        + len(REHEARSAL) * len(TRAIN_FORMS["capital"])
    assert len(heldout) == len(facts)
    trained_questions = {question(r) for r in train}
    trained_answers = {r["messages"][1]["content"] for r in train}
    for row in heldout:
        assert question(row) not in trained_questions       # a phrasing never trained on
        assert row["messages"][1]["content"] in trained_answers  # about a fact that was
        assert row["value"] in row["messages"][1]["content"]
    two = _rows(write_facts_data(tmp_path / "two", FactsSpec(provinces=10, heldout_forms=2))
                .heldout)
    assert len(two) == sum(len(HELDOUT_FORMS[f.relation]) for f in facts)


def test_rows_are_chat_rows_the_example_config_reads(tmp_path):
    paths = write_facts_data(tmp_path, FactsSpec(provinces=2))
    for row in _rows(paths.train) + _rows(paths.heldout) + _rows(paths.controls):
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])
    assert [r["value"] for r in _rows(paths.controls)] == [v for _, v in CONTROLS]


def test_the_example_config_trains_on_what_the_writer_writes():
    from pathlib import Path

    from strop.config import load_config
    from strop.demo import smollm2
    from strop.demo.real import REAL_OUT, example_config

    cfg = load_config(example_config()).cfg
    assert Path(cfg.datasets[0].path) == REAL_OUT / "data" / "train.jsonl"
    assert Path(cfg.base_model) == REAL_OUT / smollm2.FILE  # the link the demo writes
    assert Path(cfg.output_dir).parent == REAL_OUT


def test_rehearsed_real_facts_are_trained_but_no_control_is(tmp_path):
    paths = write_facts_data(tmp_path, FactsSpec(provinces=2))
    train = _rows(paths.train)
    answers = {r["messages"][1]["content"] for r in train}
    assert all(f"The capital of {country} is {city}." in answers for country, city in REHEARSAL)
    trained_text = " ".join(question(r) + " " + r["messages"][1]["content"] for r in train)
    for control_question, value in CONTROLS:
        assert control_question not in trained_text and value not in trained_text
