"""Metrics on cases small enough to compute by hand."""

import math

import numpy as np
import pytest

from models.metrics import auc, ece, group_metrics, logloss, mrr, ndcg, paired_group_auc, reliability_table
from models.ranker import PlattCalibrator


def test_auc_counts_pairs_and_half_ties():
    # pairs (click, non-click): (0.4>0.1) (0.4>0.35) (0.8>0.1) (0.8>0.35) -> 4 of 4... one swapped below
    assert auc([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8]) == 1.0
    assert auc([0, 1, 0, 1], [0.1, 0.3, 0.35, 0.8]) == 0.75  # 0.3 < 0.35: one of four pairs wrong
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_mrr_and_ndcg_follow_mind_definitions():
    assert mrr([0, 1, 0], [0.9, 0.5, 0.1]) == 0.5
    assert mrr([1, 0, 1], [0.9, 0.5, 0.3]) == pytest.approx((1 + 1 / 3) / 2)
    assert ndcg([0, 1, 0], [0.9, 0.5, 0.1], 5) == pytest.approx(1 / math.log2(3))
    assert ndcg([0, 1, 0], [0.9, 0.5, 0.1], 1) == 0.0
    # two clicks at ranks 1 and 3: (1 + 1/log2(4)) / (1 + 1/log2(3))
    assert ndcg([1, 0, 1], [0.9, 0.5, 0.3], 10) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))


def test_group_metrics_average_per_impression_and_skip_single_class():
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    labels = [1, 0, 0, 0, 1, 1, 1]  # c has only clicks: left out
    scores = [0.9, 0.1, 0.2, 0.8, 0.3, 0.5, 0.4]
    out = group_metrics(groups, labels, scores)
    assert out["impressions"] == 2
    assert out["group_auc"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["mrr"] == pytest.approx((1.0 + 0.5) / 2)


def test_paired_group_auc_difference_and_its_standard_error():
    groups = ["a", "a", "a", "b", "b", "c", "c", "d", "d"]
    labels = [1, 0, 0, 0, 1, 1, 1, 1, 0]  # c has only clicks: left out
    a = [0.9, 0.1, 0.2, 0.8, 0.3, 0.5, 0.4, 0.7, 0.6]  # per impression a, b, d: 1, 0, 1
    b = [0.1, 0.9, 0.2, 0.3, 0.8, 0.5, 0.4, 0.7, 0.6]  # 0, 1, 1
    out = paired_group_auc(groups, labels, a, b)
    diffs = np.array([1.0, -1.0, 0.0])
    assert out["impressions"] == 3
    assert out["difference"] == pytest.approx(group_metrics(groups, labels, a)["group_auc"]
                                              - group_metrics(groups, labels, b)["group_auc"])  # fmt: skip
    assert out["se"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))
    assert paired_group_auc(groups, labels, a, a) == {"difference": 0.0, "se": 0.0, "impressions": 3}


def test_logloss_and_ece():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert ece([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9]) == pytest.approx((0.1 + 0.3 + 0.4 + 0.1) / 4)
    # both rows in the bin [0.1, 0.2): predicted 0.15, observed 0.5
    assert ece([0, 1], [0.12, 0.18]) == pytest.approx(0.35)
    assert ece([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0


def test_reliability_quantile_bins_hold_equal_rows():
    p = np.linspace(0.01, 0.2, 100)
    table = reliability_table(np.zeros(100), p, 4, "quantile")
    assert [row["rows"] for row in table] == [25, 25, 25, 25]


def test_platt_calibration_recovers_a_slope_and_never_reverses_the_order() -> None:
    rng = np.random.default_rng(0)
    margins = rng.normal(size=20_000)
    labels = rng.random(20_000) < 1 / (1 + np.exp(-(2.0 * margins - 1.0)))
    fitted = PlattCalibrator.fit(margins, labels)
    assert fitted.a == pytest.approx(2.0, abs=0.1) and fitted.b == pytest.approx(-1.0, abs=0.1)
    # a small slice whose few clicks happen to sit at low margins: flattened (a = 0), not reversed
    reversed_fit = PlattCalibrator.fit(np.array([-2.0, -1.5, 0.0, 1.0, 2.0, 3.0]), np.array([1, 1, 0, 0, 0, 0]))
    assert reversed_fit.a == 0.0
    probs = reversed_fit(np.array([-1.0, 1.0]))
    assert probs[0] == pytest.approx(probs[1]) and probs[0] == pytest.approx(1 / 3, abs=0.01)


def test_summary_says_when_a_holdout_is_too_small() -> None:
    from models.evaluate import MIN_GROUPS, summary

    small = summary({"group_auc": np.float64(0.8312), "logloss": 0.2, "impressions": 18})
    assert small.startswith("group AUC 0.831, logloss 0.200 on 18 requests") and "too few" in small
    assert "np.float64" not in small
    assert "too few" not in summary({"group_auc": 0.6, "logloss": 0.2, "impressions": MIN_GROUPS})
