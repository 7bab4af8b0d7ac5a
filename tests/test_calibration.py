"""Temperature scaling and the review threshold, on cases worked out by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta

from pipeline.evaluation.calibration import (
    choose_threshold,
    coverage_precision_curve,
    fit_temperature,
    precision_lower_bound,
    selective_scores,
)
from pipeline.evaluation.metrics import expected_calibration_error


def test_temperature_scaling_cools_an_overconfident_model_and_keeps_its_argmax():
    gen = torch.Generator().manual_seed(0)
    n, k = 4000, 5
    labels = torch.randint(0, k, (n,), generator=gen)
    # a model that is right 70 % of the time but puts ~99 % on its answer
    pred = torch.where(torch.rand(n, generator=gen) < 0.7, labels, torch.randint(0, k, (n,), generator=gen))
    logits = torch.randn(n, k, generator=gen) * 0.1
    logits[torch.arange(n), pred] += 6.0
    t = fit_temperature(logits, labels)
    assert t > 1.5  # overconfident: the fitted temperature softens
    before = F.softmax(logits, 1)
    after = F.softmax(logits / t, 1)
    assert torch.equal(before.argmax(1), after.argmax(1))
    ok = (after.argmax(1) == labels).numpy()
    ece_before, _ = expected_calibration_error(before.max(1).values.numpy(), ok)
    ece_after, _ = expected_calibration_error(after.max(1).values.numpy(), ok)
    assert ece_after < ece_before / 3
    assert F.cross_entropy(logits / t, labels) < F.cross_entropy(logits, labels)
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_threshold_is_the_lowest_confidence_that_reaches_the_target_precision():
    # confidences, best first; the 3rd and 6th are wrong
    conf = np.array([0.99, 0.98, 0.97, 0.95, 0.90, 0.80, 0.70, 0.60])
    correct = np.array([1, 1, 0, 1, 1, 0, 1, 1], dtype=bool)
    curve = coverage_precision_curve(conf, correct)
    assert curve["coverage"].tolist() == [i / 8 for i in range(1, 9)]
    assert curve["precision"].tolist() == pytest.approx([1, 1, 2 / 3, 3 / 4, 4 / 5, 4 / 6, 5 / 7, 6 / 8])
    assert curve["sorted"].tolist() == list(range(1, 9)) and curve["correct"].tolist() == [1, 2, 2, 3, 4, 4, 5, 6]
    # precision >= 0.75: the largest prefix reaching it is all 8 rows (6/8)
    t = choose_threshold(conf, correct, 0.75, confidence_level=None)
    assert (t.threshold, t.coverage, t.precision, t.met) == (0.60, 1.0, 0.75, True)
    # precision >= 0.8: 5 rows (4/5), threshold 0.90
    t = choose_threshold(conf, correct, 0.8, confidence_level=None)
    assert (t.threshold, t.coverage, t.precision) == (0.90, 5 / 8, 0.8)
    # precision 1: only the two best rows
    t = choose_threshold(conf, correct, 1.0, confidence_level=None)
    assert (t.threshold, t.coverage) == (0.98, 2 / 8)
    # nothing reaches it: everything to review
    t = choose_threshold(np.array([0.9, 0.8]), np.array([False, True]), 0.99, confidence_level=None)
    assert (t.threshold, t.met, t.coverage) == (1.0, False, 0.0) and math.isnan(t.precision)
    with pytest.raises(ValueError, match=r"target precision must be in \(0, 1\]"):
        choose_threshold(conf, correct, 1.5)


def test_threshold_needs_the_precision_bound_not_just_the_measured_precision():
    # 1,000 rows, all right: the 0.9 Clopper-Pearson lower bound is 0.1 ** (1 / 1000) = 0.99770 >= 0.995
    conf = np.linspace(0.999, 0.5, 1000)
    t = choose_threshold(conf, np.ones(1000, bool), 0.995)
    assert (t.threshold, t.coverage, t.met, t.confidence_level) == (0.5, 1.0, True, 0.9)
    assert t.precision_bound == pytest.approx(0.1 ** (1 / 1000))
    # 100 rows, all right: measured precision 1.0, but the bound 0.1 ** (1 / 100) = 0.977 cannot reach 0.995
    t = choose_threshold(conf[:100], np.ones(100, bool), 0.995)
    assert not t.met and t.threshold == 1.0
    assert choose_threshold(conf[:100], np.ones(100, bool), 0.995, confidence_level=None).met
    # 3,000 rows, wrong at the 300th and 700th highest confidence and every 10th row from the 2,000th: the first
    # 299 rows alone bound at 0.1 ** (1 / 299) = 0.9923 < 0.995, so the threshold is where enough right rows
    # follow the two wrong ones; brute force over every prefix with the Beta quantile (k right of n: the 0.1
    # quantile of Beta(k, n - k + 1)) gives the same
    conf = np.linspace(0.999, 0.5, 3000)
    correct = np.ones(3000, bool)
    correct[[299, 699]] = False
    correct[2000::10] = False
    t = choose_threshold(conf, correct, 0.995)
    right = np.cumsum(correct)
    bounds = [beta.ppf(0.1, right[i], i + 1 - right[i] + 1) for i in range(3000)]
    n = max(i + 1 for i in range(3000) if bounds[i] >= 0.995)
    assert 1000 < n < 2100 and (t.threshold, t.coverage) == (conf[n - 1], n / 3000)
    assert t.precision_bound == pytest.approx(bounds[n - 1])
    assert precision_lower_bound(right[n - 1], n, 0.9) == pytest.approx(bounds[n - 1])
    assert precision_lower_bound(299, 299, 0.9) == pytest.approx(0.1 ** (1 / 299)) and 0.1 ** (1 / 299) < 0.995
    with pytest.raises(ValueError, match=r"confidence level must be in \[0.5, 1\)"):
        choose_threshold(conf, correct, 0.995, confidence_level=0.3)


def test_ties_in_confidence_are_one_threshold():
    conf = np.array([0.9, 0.9, 0.8])
    correct = np.array([True, False, True])
    curve = coverage_precision_curve(conf, correct)
    assert curve["threshold"].tolist() == [0.9, 0.8]
    assert curve["coverage"].tolist() == pytest.approx([2 / 3, 1.0])


def test_selective_scores_on_a_split():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0])
    s = selective_scores(probs, y, 0.7)
    assert s == {"threshold": 0.7, "coverage": 0.5, "precision": 1.0, "sorted": 2, "needs_review": 2,
                 "errors_sorted": 0}
    s = selective_scores(probs, y, 0.5)
    assert (s["sorted"], s["errors_sorted"], s["precision"]) == (4, 2, 0.5)
