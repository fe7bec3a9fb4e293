"""Exact match normalisation, ROUGE-1, average accuracy and backward transfer."""

from __future__ import annotations

import pytest

from deal_train.train.evaluation import average_accuracy, backward_transfer, exact_match, normalize_answer, rouge1, score


@pytest.mark.parametrize("prediction", ["World", " World", "World\n", "World</s>", "World <pad>", "world.",
                                        "World<|im_end|>"])
def test_exact_match_accepts_formatting_variants(prediction):
    assert exact_match(prediction, "World") == 1.0


@pytest.mark.parametrize("prediction", ["Worlds", "World news", "", "Sports"])
def test_exact_match_rejects_other_answers(prediction):
    assert exact_match(prediction, "World") == 0.0


def test_copa_labels_survive_normalisation():
    assert normalize_answer("A") == "a"
    assert exact_match("A", "A") == 1.0 and exact_match("", "A") == 0.0 and exact_match("B", "A") == 0.0


def test_rouge1_uses_stemming():
    assert rouge1("very negative", "very negative") == pytest.approx(1.0)
    assert rouge1("negative", "very negative") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge1("running", "runs") == pytest.approx(1.0)  # Porter stemmer


def test_aa_and_bwt_hand_computed():
    m = [[80.0, 70.0, 60.0],
         [None, 50.0, 40.0],
         [None, None, 90.0]]
    assert average_accuracy(m) == pytest.approx((60 + 40 + 90) / 3)
    assert backward_transfer(m) == pytest.approx(((60 - 80) + (40 - 50)) / 2)
    assert backward_transfer([[10.0]]) is None
    with pytest.raises(ValueError):
        average_accuracy([[1.0, None], [None, None]])


def test_score_in_percent():
    rows = [{"prediction": "World", "label": "World"}, {"prediction": "Sports", "label": "World"}]
    s = score(rows)
    assert s["exact_match"] == 50.0 and rows[0]["exact_match"] == 1.0 and rows[1]["rouge1"] == 0.0
