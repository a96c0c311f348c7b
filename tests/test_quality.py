"""ROUGE, the lead-N baseline, and agreement between two generations."""

from __future__ import annotations

import pytest

from testbed.quality import lead_n, prefix_agreement, rouge, token_agreement


def test_rouge_of_identical_strings_is_one():
    text = "the court gained jurisdiction over crimes in the territories ."
    scores = rouge([text, "a b c"], [text, "a b c"])
    assert scores.rouge1 == pytest.approx(1.0)
    assert scores.rouge2 == pytest.approx(1.0)
    assert scores.rougeL == pytest.approx(1.0)


def test_rouge_of_disjoint_strings_is_zero():
    scores = rouge(["alpha beta gamma"], ["delta epsilon zeta"])
    assert (scores.rouge1, scores.rouge2, scores.rougeL) == (0.0, 0.0, 0.0)


def test_rouge_is_the_mean_over_pairs():
    scores = rouge(["same words here", "alpha beta"], ["same words here", "gamma delta"])
    assert scores.rougeL == pytest.approx(0.5)


def test_rouge_stems_and_ignores_case():
    assert rouge(["The cats sat."], ["the cat sat"]).rougeL == pytest.approx(1.0)


def test_rouge_l_rewards_order():
    ref = "a b c d"
    in_order, reversed_ = rouge(["a b c d"], [ref]).rougeL, rouge(["d c b a"], [ref]).rougeL
    assert in_order > reversed_ > 0.0
    assert rouge(["d c b a"], [ref]).rouge1 == pytest.approx(1.0)


def test_rouge_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


def test_rouge_of_nothing_raises():
    with pytest.raises(ValueError, match="no predictions"):
        rouge([], [])


def test_lead_n():
    article = "First sentence. Second one! Third? Fourth sentence. Fifth."
    assert lead_n(article) == "First sentence. Second one! Third?"
    assert lead_n(article, 1) == "First sentence."
    assert lead_n("  Only one line without an end  ", 3) == "Only one line without an end"
    assert lead_n("A. B.", 5) == "A. B."


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # measured over the longer output
    assert token_agreement([], []) == 1.0
    assert token_agreement([], [5]) == 0.0


def test_prefix_agreement():
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert prefix_agreement([1, 2, 3], [1, 2, 3]) == 3
    assert prefix_agreement([1, 2], [1, 2, 3]) == 2
    assert prefix_agreement([7], [8]) == 0
    assert prefix_agreement([], [1]) == 0
