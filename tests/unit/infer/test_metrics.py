"""Answer metrics on fixed strings."""

import pytest

from strop.infer.metrics import answer_metrics, contains, exact_match, normalise, token_f1


def test_normalise_strips_collapses_whitespace_and_lowercases():
    assert normalise("  The  River\n\tflows ") == "the river flows"


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match("Paris", " paris\n") == 1.0
    assert exact_match("the  capital is Paris", "The capital is paris") == 1.0
    assert exact_match("Paris.", "Paris") == 0.0  # punctuation counts


def test_contains():
    assert contains("I think it is Paris, France", "paris") == 1.0
    assert contains("London", "Paris") == 0.0


@pytest.mark.parametrize("prediction, reference, f1", [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat", "the cat sat on", 2 * (1.0 * 0.5) / 1.5),          # p=1, r=1/2 -> 2/3
    ("a b c d", "a x", 2 * (0.25 * 0.5) / 0.75),                   # p=1/4, r=1/2 -> 1/3
    ("cat cat cat", "cat", 2 * (1 / 3 * 1.0) / (1 / 3 + 1.0)),     # counts matter -> 1/2
    ("dog", "cat", 0.0),
    ("", "", 1.0),
    ("", "cat", 0.0),
])
def test_token_f1(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_answer_metrics_are_means_with_the_stop_rate():
    got = answer_metrics(["Paris", "it is london", "x"], ["paris", "London", "y"],
                         [True, False, True])
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["contains"] == pytest.approx(2 / 3)
    assert got["token_f1"] == pytest.approx((1 + 2 * (1 / 3) / (1 / 3 + 1) + 0) / 3)
    assert got["stop_rate"] == pytest.approx(2 / 3) and got["n"] == 3
    assert answer_metrics([], [], [])["n"] == 0
