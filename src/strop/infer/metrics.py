"""Answer metrics: a generated text against the row's reference answer.

Texts are normalised before comparing: stripped, runs of whitespace collapsed to one space,
lower-cased. No punctuation or article stripping (SQuAD's rules): a fine-tune that learned the
answer's punctuation should get credit for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def contains(prediction: str, reference: str) -> float:
    """1 when the normalised reference appears in the normalised prediction."""
    return float(normalise(reference) in normalise(prediction))


def token_f1(prediction: str, reference: str) -> float:
    """F1 over whitespace tokens of the normalised texts (bag of words, counts matter)."""
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(predictions: Sequence[str], references: Sequence[str],
                   stopped: Sequence[bool]) -> dict[str, float | int]:
    """Means over the rows: exact_match, contains, token_f1, and stop_rate (share of
    generations that ended with EOS within the token budget)."""
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "contains": 0.0, "token_f1": 0.0, "stop_rate": 0.0, "n": 0}
    pairs = list(zip(predictions, references, strict=True))
    return {"exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
            "contains": sum(contains(p, r) for p, r in pairs) / n,
            "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
            "stop_rate": sum(map(bool, stopped)) / n, "n": n}
