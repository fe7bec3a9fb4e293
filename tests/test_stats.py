"""Bootstrap intervals and the power calculation on synthetic per-row predictions (issue 21)."""

import gzip
import json
import math

import numpy as np
import pytest

from deal_train.tools import stats

ROWS = [500, 500, 439, 500]


def _rows(n, correct):
    """n per-row exact matches, the first ``correct`` of them right."""
    return np.r_[np.ones(correct), np.zeros(n - correct)]


def test_known_difference_is_significant():
    a = [_rows(n, int(0.8 * n)) for n in ROWS]
    b = [_rows(n, int(0.7 * n)) for n in ROWS]
    iv = stats.paired_difference_interval(a, b, n_resamples=2000)
    assert iv.estimate == pytest.approx(np.mean([x.mean() - y.mean() for x, y in zip(a, b)]))
    assert iv.excludes_zero and iv.low > 0.05


def test_zero_difference_is_not_significant():
    # same accuracy, different rows right: the methods disagree on 40% of rows but AA is equal
    a = [_rows(n, n // 2) for n in ROWS]
    b = [np.roll(x, n // 5) for x, n in zip(a, ROWS)]
    iv = stats.paired_difference_interval(a, b, n_resamples=2000)
    assert abs(iv.estimate) < 1e-2
    assert not iv.excludes_zero


def test_identical_predictions_give_a_point_interval():
    a = [_rows(n, n // 3) for n in ROWS]
    iv = stats.paired_difference_interval(a, a)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.excludes_zero


def test_aa_interval_width_matches_the_binomial_standard_error():
    rng = np.random.default_rng(1)
    a = [(rng.random(n) < 0.5).astype(float) for n in ROWS]
    iv = stats.aa_interval(a, n_resamples=4000)
    se = stats.aa_standard_error(ROWS, 0.5)
    assert (iv.high - iv.low) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert iv.low < iv.estimate < iv.high


def test_bwt_uses_the_same_rows_and_the_first_tasks():
    diag = [_rows(n, int(0.9 * n)) for n in ROWS]
    final = [_rows(n, int(0.6 * n)) for n in ROWS]
    iv = stats.bwt_interval(final, diag, n_resamples=2000)
    expected = np.mean([f.mean() - d.mean() for f, d in zip(final[:-1], diag[:-1])])
    assert iv.estimate == pytest.approx(expected) and iv.high < 0
    with pytest.raises(ValueError, match="same test rows"):
        stats.bwt_interval([final[0][:10], final[1]], [diag[0], diag[1]])


def test_standard_errors():
    assert stats.aa_standard_error([500] * 4) == pytest.approx(math.sqrt(4 * 0.25 / 500) / 4)
    assert stats.paired_difference_standard_error([500] * 4, 0.2) == pytest.approx(math.sqrt(4 * 0.2 / 500) / 4)
    with pytest.raises(ValueError, match="disagreement"):
        stats.paired_difference_standard_error([500], 1.5)


def test_read_exact_match_plain_and_gzip(tmp_path):
    rows = [{"index": 1, "prediction": "b", "label": "a", "exact_match": 0.0},
            {"index": 0, "prediction": "a", "label": "a", "exact_match": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "1-x.jsonl").write_text(text)
    with gzip.open(tmp_path / "2-y.jsonl.gz", "wt") as f:
        f.write(text)
    assert stats.read_exact_match(stats.find_prediction_file(str(tmp_path), 0, "x")).tolist() == [1.0, 0.0]
    assert stats.read_exact_match(stats.find_prediction_file(str(tmp_path), 1, "y")).tolist() == [1.0, 0.0]
    with pytest.raises(FileNotFoundError, match="3-z.jsonl"):
        stats.find_prediction_file(str(tmp_path), 2, "z")


def test_significance_sentence_claims_only_when_the_interval_excludes_zero():
    a = [_rows(n, int(0.8 * n)) for n in ROWS]
    b = [_rows(n, int(0.7 * n)) for n in ROWS]
    c = [np.roll(x, 50) for x in a]
    yes = stats.significance_sentence("deal", "seq_lora", stats.paired_difference_interval(a, b, n_resamples=2000))
    no = stats.significance_sentence("deal", "seq_lora", stats.paired_difference_interval(a, c, n_resamples=2000))
    assert "is above `seq_lora`" in yes and "excludes 0" in yes
    assert "cannot be told apart" in no and "contains 0" in no


def test_run_row_scores_reads_a_run_folder(tmp_path):
    from deal_train.outputs.layout import RunLayout
    from deal_train.outputs.writing import write_predictions

    tasks = ["a", "b"]
    lay = RunLayout(str(tmp_path))
    for t, task in enumerate(tasks):
        for i in range(t + 1):
            em = [1.0, 0.0, float(t == i)]
            write_predictions(RunLayout.prediction_file(lay.predictions(t, task), i, tasks[i]),
                              [{"index": k, "prediction": "", "label": "", "exact_match": e, "rouge1": e}
                               for k, e in enumerate(em)])
    final, diag = stats.run_row_scores(str(tmp_path), tasks)
    assert [f.tolist() for f in final] == [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    assert [d.tolist() for d in diag] == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
