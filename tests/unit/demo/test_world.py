"""The demo's synthetic world: deterministic, and split so that held-out questions test knowledge
from pretraining, not memorised question -> answer pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strop.demo.world import ANSWER, QUESTION, QUESTIONS, WorldSpec, make_facts, write_demo_data

SMALL = WorldSpec(people=30, towns=5, statements_per_fact=3, heldout_fraction=0.3, seed=7)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("world"), SMALL)


def test_the_same_spec_writes_the_same_bytes(written, tmp_path):
    again = write_demo_data(tmp_path, SMALL)
    for first, second in zip((written.corpus, written.qa_train, written.qa_heldout),
                             (again.corpus, again.qa_train, again.qa_heldout), strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_another_seed_makes_another_world(tmp_path):
    other = write_demo_data(tmp_path, WorldSpec(people=30, towns=5, statements_per_fact=3, seed=8))
    assert other.corpus.read_text() != write_demo_data(tmp_path / "b", SMALL).corpus.read_text()


def test_sizes_match_the_spec(written):
    facts = make_facts(SMALL)
    people = {f.subject for f in facts if f.relation != "region"}
    towns = {f.subject for f in facts if f.relation == "region"}
    assert (len(people), len(towns)) == (SMALL.people, SMALL.towns)
    assert len({p.split()[0] for p in people}) == SMALL.people  # first names are unique
    # statements_per_fact documents per subject, and each training question answered once
    assert len(written.corpus.read_text().splitlines()) == SMALL.statements_per_fact * (
        SMALL.people + SMALL.towns) + len(read_jsonl(written.qa_train))
    heldout = read_jsonl(written.qa_heldout)
    assert abs(len(heldout) - SMALL.heldout_fraction * len(facts)) <= len(QUESTIONS)


def test_held_out_facts_are_stated_in_the_corpus_several_times(written):
    documents = written.corpus.read_text().splitlines()
    for row in read_jsonl(written.qa_heldout):
        stating = [d for d in documents if row["subject"] in d and row[ANSWER] in d]
        assert len(stating) >= SMALL.statements_per_fact, row


def test_held_out_questions_are_never_in_the_corpus_but_training_ones_are(written):
    corpus = written.corpus.read_text()
    assert all(r[QUESTION] not in corpus for r in read_jsonl(written.qa_heldout))
    assert all(f"Question: {r[QUESTION]} Answer: {r[ANSWER]}." in corpus
               for r in read_jsonl(written.qa_train))


def test_no_held_out_fact_is_asked_in_training(written):
    train = read_jsonl(written.qa_train)
    heldout = read_jsonl(written.qa_heldout)
    trained_facts = {(r["relation"], r["subject"]) for r in train}
    assert not {r[QUESTION] for r in heldout} & {r[QUESTION] for r in train}
    assert not {(r["relation"], r["subject"]) for r in heldout} & trained_facts
    # ... and every relation is taught, so the held-out questions ask for a known skill
    assert {r["relation"] for r in heldout} <= {r["relation"] for r in train}


def test_answers_are_one_short_word(written):
    for row in read_jsonl(written.qa_train) + read_jsonl(written.qa_heldout):
        assert set(row) >= {QUESTION, ANSWER}
        assert " " not in row[ANSWER] and 0 < len(row[ANSWER]) <= 12, row
