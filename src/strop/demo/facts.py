"""Made-up facts for `strop demo --real`: a country that does not exist, asked about in chat.

SmolLM2-135M-Instruct has read a great deal of the web, so a fair test of fine-tuning is
something no web page says: the provinces of the invented country of Quenvar, each with a
capital, a founder, an emblem animal and a famous export. The fine-tune trains on a few
phrasings of each question (`TRAIN_FORMS`) and is asked others it never saw (`HELDOUT_FORMS`),
so a right answer means the fact was learned, not the string. Control questions the base model
already answers (`CONTROLS`) show what it knew before is still there; real capitals it knows
(`REHEARSAL`) are trained beside the made-up ones so that the fine-tune does not overwrite them.

Rows are OpenAI-style chat (`messages`), what `type: chat_template` reads. Each answer is one
sentence in a fixed form per relation ("The capital of Drelmar is Quostin."), so exact match on
the whole sentence is a fair score; `value` is the fact's key word ("Quostin"), for a looser
"names the right answer" score. Everything is a pure function of `FactsSpec`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from strop.demo.world import _names

COUNTRY = "Quenvar"
ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "stag", "salmon", "boar", "swan",
           "hare", "wolf", "crane", "beaver", "eagle", "fox", "bison"]
EXPORTS = ["salt", "copper", "wool", "amber", "honey", "glass", "silk", "tea", "figs", "pearls",
           "cheese", "timber", "tin", "saffron", "marble", "linen"]

# The answer's sentence per relation, and the questions that ask for it: trained phrasings and
# held-out ones. {s} is the province, {v} the value.
ANSWERS = {
    "capital": "The capital of {s} is {v}.",
    "founder": "{s} was founded by {v}.",
    "animal": "The emblem of {s} is the {v}.",
    "export": "{s} is famous for its {v}.",
}
TRAIN_FORMS = {
    "capital": ["What is the capital of {s}?", "Which city is the capital of {s}?",
                "Name the capital of the province of {s}."],
    "founder": ["Who founded {s}?", "Who was the founder of {s}?",
                "Which person founded the province of {s}?"],
    "animal": ["What animal is the emblem of {s}?", "Which animal is on the emblem of {s}?",
               "What is the emblem animal of the province of {s}?"],
    "export": ["What is {s} famous for?", "What is the famous export of {s}?",
               "Which product is the province of {s} known for?"],
}
HELDOUT_FORMS = {
    "capital": ["Tell me the capital city of {s}.", "{s} has which city as its capital?"],
    "founder": ["Name the founder of {s}.", "By whom was {s} founded?"],
    "animal": ["Tell me which animal is the emblem of {s}.", "{s} has which animal as its emblem?"],
    "export": ["Tell me what {s} is famous for.", "{s} is known for which product?"],
}
# Rehearsal: real facts the base model knows, trained in the same answer forms beside the made-up
# ones. Without them, 40 made-up capitals teach the model that every "capital of" question has an
# invented answer, and it answers the capital of France with one (seen: "Seine"). None of these
# is a control question below; the controls stay unseen.
REHEARSAL = [("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
             ("Canada", "Ottawa"), ("Kenya", "Nairobi")]
# What the base model answers right before fine-tuning (checked on SmolLM2-135M-Instruct);
# after it, it should still. (question, the word a right answer names)
CONTROLS = [("What is the capital of France?", "Paris"),
            ("What is the capital of Japan?", "Tokyo"),
            ("What color is the sky on a clear day?", "blue")]


@dataclass(frozen=True)
class FactsSpec:
    """How many provinces (four facts each) and how many held-out phrasings each fact gets."""

    provinces: int = 10      # 40 facts
    heldout_forms: int = 1   # 1 or 2: held-out questions per fact
    seed: int = 0


@dataclass(frozen=True)
class Fact:
    relation: str   # capital, founder, animal, export
    subject: str    # the province
    value: str      # the answer's key word

    @property
    def answer(self) -> str:
        return ANSWERS[self.relation].format(s=self.subject, v=self.value)


@dataclass(frozen=True)
class FactsPaths:
    train: Path      # chat rows to fine-tune on: every fact in every TRAIN_FORMS phrasing
    heldout: Path    # chat rows asking the same facts in HELDOUT_FORMS phrasings, with `value`
    controls: Path   # general-knowledge chat rows, with `value`


def make_facts(spec: FactsSpec) -> list[Fact]:
    """Four facts per province, values unique within a relation."""
    if not 1 <= spec.provinces <= min(len(ANIMALS), len(EXPORTS)):
        raise ValueError(f"provinces must be 1..{min(len(ANIMALS), len(EXPORTS))}")
    rng = random.Random(spec.seed)
    taken: set[str] = {COUNTRY}
    provinces = _names(rng, spec.provinces, (2, 3), taken)
    capitals = _names(rng, spec.provinces, (2, 2), taken)
    founders = [f"{a} {b}" for a, b in zip(_names(rng, spec.provinces, (2, 2), taken),
                                            _names(rng, spec.provinces, (2, 2), taken),
                                            strict=True)]
    animals = rng.sample(ANIMALS, spec.provinces)
    exports = rng.sample(EXPORTS, spec.provinces)
    facts = []
    for i, province in enumerate(provinces):
        facts += [Fact("capital", province, capitals[i]), Fact("founder", province, founders[i]),
                  Fact("animal", province, animals[i]), Fact("export", province, exports[i])]
    return facts


def _row(question: str, answer: str, **extra: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}], **extra}


def train_rows(facts: list[Fact], spec: FactsSpec) -> list[dict]:
    """Every fact in every trained phrasing, and the REHEARSAL capitals the same way."""
    real = [Fact("capital", country, city) for country, city in REHEARSAL]
    rows = [_row(form.format(s=f.subject), f.answer)
            for f in facts + real for form in TRAIN_FORMS[f.relation]]
    random.Random(spec.seed + 1).shuffle(rows)
    return rows


def heldout_rows(facts: list[Fact], spec: FactsSpec) -> list[dict]:
    """Questions in phrasings the fine-tune never sees; `heldout_forms` of them per fact."""
    rng = random.Random(spec.seed + 2)
    rows = []
    for f in facts:
        forms = HELDOUT_FORMS[f.relation]
        for form in rng.sample(forms, min(spec.heldout_forms, len(forms))):
            rows.append(_row(form.format(s=f.subject), f.answer, value=f.value,
                             relation=f.relation))
    return rows


def control_rows() -> list[dict]:
    return [_row(q, v, value=v, relation="control") for q, v in CONTROLS]


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_facts_data(out_dir: str | Path, spec: FactsSpec = FactsSpec()) -> FactsPaths:
    """Write train.jsonl, heldout.jsonl and controls.jsonl into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(spec)
    paths = FactsPaths(out / "train.jsonl", out / "heldout.jsonl", out / "controls.jsonl")
    _write_jsonl(paths.train, train_rows(facts, spec))
    _write_jsonl(paths.heldout, heldout_rows(facts, spec))
    _write_jsonl(paths.controls, control_rows())
    return paths


if __name__ == "__main__":  # python -m strop.demo.facts [out_dir]: what the example config reads
    import sys

    written = write_facts_data(sys.argv[1] if len(sys.argv) > 1 else "demo-out/smollm2/data")
    for path in (written.train, written.heldout, written.controls):
        print(path)
