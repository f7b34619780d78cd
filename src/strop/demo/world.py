"""A small synthetic world for `strop demo`: people, towns and guilds, prose about them, and
question -> answer pairs split by fact.

The demo pretrains a tiny model on the prose, fine-tunes it on some question -> answer pairs
and asks it the held-out ones. For that to measure anything:
- every held-out fact is stated in the prose (the knowledge comes from pretraining; the
  fine-tune only teaches the question -> answer skill), and its question is never in qa-train;
- each fact is stated several times in different words and orders (a 3M-parameter model needs
  that to store a fact so it can be asked for it, not just recite one sentence);
- answers are one short word (a town, a colour, an animal, a guild, a direction), so exact
  match is a fair score.

Everything is a pure function of `WorldSpec` (seeded, no downloads): the same spec writes the
same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Field names of a Q/A row; the fine-tune configs' `type:` mapping uses the same names
# (field_instruction: question, field_output: answer), so an evaluator can render a held-out
# row with the run's own prompt format and compare its answer field.
QUESTION, ANSWER = "question", "answer"

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown"]
PETS = ["cat", "dog", "goat", "owl", "horse", "rabbit", "parrot", "tortoise", "ferret", "hen"]
GUILDS = ["Weavers", "Masons", "Bakers", "Smiths", "Potters", "Tanners", "Brewers", "Carpenters"]
REGIONS = ["north", "south", "east", "west"]

# Invented names from syllables: unlike real names they carry no prior meaning, and each person's
# first name is unique so a question names exactly one person.
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "th",
          "sh", "gr", "st"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m"]

# Several sentence templates per relation: the same fact in different words.
PERSON_SENTENCES = {
    "town": ["{name} lives in {value}.",
             "{name} has a house in {value}.",
             "The home of {name} is in the town of {value}.",
             "{name} grew up in {value} and still lives there."],
    "colour": ["The favourite colour of {name} is {value}.",
               "{name} likes the colour {value} best.",
               "{name} paints every door {value}, the colour {name} loves most.",
               "Of all colours, {name} prefers {value}."],
    "pet": ["{name} keeps a {value} as a pet.",
            "{name} owns a pet {value}.",
            "Every morning {name} feeds a pet {value}.",
            "The pet of {name} is a {value}."],
    "guild": ["{name} is a member of the {value} guild.",
              "{name} joined the {value} guild long ago.",
              "The {value} guild counts {name} among its members.",
              "{name} works for the {value} guild."],
}
TOWN_SENTENCES = ["{name} lies in the {value} of the land.",
                  "The town of {name} is in the {value}.",
                  "Travellers find {name} in the {value} of the land.",
                  "{name} is a town of the {value}."]
QUESTIONS = {
    "town": ["Where does {name} live?", "In which town does {name} live?"],
    "colour": ["What is the favourite colour of {name}?", "Which colour does {name} like best?"],
    "pet": ["What pet does {name} keep?", "Which animal is the pet of {name}?"],
    "guild": ["Which guild is {name} a member of?", "What guild does {name} belong to?"],
    "region": ["In which part of the land is {name}?", "Where in the land is {name}?"],
}


@dataclass(frozen=True)
class WorldSpec:
    """How big the world is and how it is split; everything follows from these and `seed`."""

    people: int = 80
    towns: int = 8
    statements_per_fact: int = 6    # documents that state each fact, each in its own words
    heldout_fraction: float = 0.3   # share of facts whose questions are only in qa-heldout
    seed: int = 0


@dataclass(frozen=True)
class Fact:
    relation: str   # town, colour, pet, guild (of a person) or region (of a town)
    subject: str    # the person's or town's name
    value: str      # the answer: one short word


@dataclass(frozen=True)
class DemoDataPaths:
    corpus: Path        # prose, one document per line (strop's plain-text format)
    qa_train: Path      # {question, answer, relation, subject} rows the fine-tunes train on
    qa_heldout: Path    # the same for facts whose questions the fine-tunes never see


def _names(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        parts = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables))]
        name = ("".join(parts) + rng.choice(CODAS)).capitalize()
        if name not in taken and len(name) >= 4:
            taken.add(name)
            names.append(name)
    return names


def make_facts(spec: WorldSpec) -> list[Fact]:
    """Every fact of the world, people first, in a fixed order."""
    rng = random.Random(spec.seed)
    taken: set[str] = set()
    towns = _names(rng, spec.towns, (2, 2), taken)
    first = _names(rng, spec.people, (2, 2), taken)
    last = _names(rng, spec.people, (2, 2), taken)
    facts: list[Fact] = []
    for given, family in zip(first, last, strict=True):
        person = f"{given} {family}"
        facts += [Fact("town", person, rng.choice(towns)),
                  Fact("colour", person, rng.choice(COLOURS)),
                  Fact("pet", person, rng.choice(PETS)),
                  Fact("guild", person, rng.choice(GUILDS))]
    facts += [Fact("region", town, rng.choice(REGIONS)) for town in towns]
    return facts


def corpus_documents(facts: list[Fact], train: list[Fact], spec: WorldSpec) -> list[str]:
    """Prose about the world: `statements_per_fact` short biographies of each person (every
    fact about them, sentences in a shuffled order, each sentence from a random template) and as
    many notes about each town. The full name is in every sentence, never a pronoun, so each
    statement links the name to the value directly.

    The training facts' questions are in it too, answered in the prompt form the fine-tunes use
    ("Question: Where does X live? Answer: Tisei."; with a full stop, where the fine-tunes
    learn to stop after the bare answer): a small
    model that has only read biographies stores a fact keyed to "X lives in", and fine-tuning
    alone does not teach it to fetch the fact from a question; reading some questions while it
    stores the facts does (mixed training, Allen-Zhu & Li, Physics of LMs 3.1). Held-out
    questions are never in it."""
    rng = random.Random(spec.seed + 1)
    by_subject: dict[str, list[Fact]] = {}
    for fact in facts:
        by_subject.setdefault(fact.subject, []).append(fact)
    documents = []
    for _ in range(spec.statements_per_fact):
        for subject, known in by_subject.items():
            sentences = []
            for fact in known:
                templates = TOWN_SENTENCES if fact.relation == "region" else PERSON_SENTENCES[fact.relation]
                sentences.append(rng.choice(templates).format(name=subject, value=fact.value))
            rng.shuffle(sentences)
            documents.append(" ".join(sentences))
    for fact in train:
        documents += [f"Question: {q.format(name=fact.subject)} Answer: {fact.value}."
                      for q in QUESTIONS[fact.relation]]
    rng.shuffle(documents)
    return documents


def split_facts(facts: list[Fact], spec: WorldSpec) -> tuple[list[Fact], list[Fact]]:
    """(train, held out), split by fact within each relation so both sides have every relation."""
    rng = random.Random(spec.seed + 2)
    train, heldout = [], []
    for relation in QUESTIONS:
        group = [f for f in facts if f.relation == relation]
        rng.shuffle(group)
        cut = round(len(group) * spec.heldout_fraction)
        heldout += group[:cut]
        train += group[cut:]
    return train, heldout


def qa_rows(facts: list[Fact], spec: WorldSpec, every_phrasing: bool) -> list[dict[str, str]]:
    """Question -> answer rows. Training facts get every phrasing of their question (more ways to
    learn the skill); a held-out fact gets one, so each held-out fact counts once in exact match."""
    rng = random.Random(spec.seed + 3)
    rows = []
    for fact in facts:
        phrasings = QUESTIONS[fact.relation] if every_phrasing else [rng.choice(QUESTIONS[fact.relation])]
        for question in phrasings:
            rows.append({QUESTION: question.format(name=fact.subject), ANSWER: fact.value,
                         "relation": fact.relation, "subject": fact.subject})
    rng.shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_demo_data(out_dir: str | Path, spec: WorldSpec = WorldSpec()) -> DemoDataPaths:
    """Write corpus.txt, qa-train.jsonl and qa-heldout.jsonl into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(spec)
    train, heldout = split_facts(facts, spec)
    paths = DemoDataPaths(out / "corpus.txt", out / "qa-train.jsonl", out / "qa-heldout.jsonl")
    paths.corpus.write_text("\n".join(corpus_documents(facts, train, spec)) + "\n")
    _write_jsonl(paths.qa_train, qa_rows(train, spec, every_phrasing=True))
    _write_jsonl(paths.qa_heldout, qa_rows(heldout, spec, every_phrasing=False))
    return paths


if __name__ == "__main__":  # python -m strop.demo.world [out_dir]: the data the demo configs read
    import sys

    written = write_demo_data(sys.argv[1] if len(sys.argv) > 1 else "demo-out/data")
    for path in (written.corpus, written.qa_train, written.qa_heldout):
        print(path)
