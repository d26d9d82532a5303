"""Clinical metrics against scikit-learn, bootstrap intervals, threshold choice on val only."""

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from fracture_jax.scoring import (ECE_BINS, all_metrics, bootstrap_ci, choose_threshold,
                                  confusion, expected_calibration_error, score_split)


def _scores(n, seed=0, signal=1.5):
    """Labels and probabilities of a moderately good, not perfectly calibrated classifier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1.5, n))))
    return y, p


def test_every_metric_equals_scikit_learn():
    y, p = _scores(300)
    t = 0.42
    pred = (p >= t).astype(int)
    m = all_metrics(y, p, t)
    expected = {
        "accuracy": skm.accuracy_score(y, pred), "precision": skm.precision_score(y, pred),
        "recall": skm.recall_score(y, pred), "specificity": skm.recall_score(y, pred, pos_label=0),
        "npv": skm.precision_score(y, pred, pos_label=0), "f1": skm.f1_score(y, pred),
        "roc_auc": skm.roc_auc_score(y, p), "pr_auc": skm.average_precision_score(y, p),
        "brier": skm.brier_score_loss(y, p)}
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-12), k
    # ECE from scikit-learn's reliability curve, weighted by each bin's share of the examples
    frac_pos, mean_prob = calibration_curve(y, p, n_bins=ECE_BINS, strategy="uniform")
    bins = np.searchsorted(np.linspace(0, 1, ECE_BINS + 1)[1:-1], p)
    counts = np.bincount(bins, minlength=ECE_BINS)
    ece = np.sum(counts[counts > 0] / len(p) * np.abs(frac_pos - mean_prob))
    assert m["ece"] == pytest.approx(ece, rel=1e-12)
    assert confusion(y, p, t) == skm.confusion_matrix(y, pred).tolist()
    report = score_split(y, p, t, resamples=10, seed=0)["classification_report"]
    assert report["fractured"]["recall"] == pytest.approx(m["recall"])
    assert report["not_fractured"]["recall"] == pytest.approx(m["specificity"])


def test_weights_equal_an_explicit_resample():
    """A bootstrap resample is a multinomial weight vector: same numbers as copying rows."""
    y, p = _scores(120, seed=1)
    w = np.random.default_rng(5).multinomial(len(y), np.full(len(y), 1 / len(y)))
    weighted = all_metrics(y, p, 0.5, weights=w)
    copied = all_metrics(np.repeat(y, w), np.repeat(p, w), 0.5)
    for k in copied:
        assert weighted[k] == pytest.approx(copied[k], rel=1e-9), k


def test_perfectly_calibrated_scores_have_small_ece():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.15


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_data():
    widths = {}
    for n in (100, 1600):
        y, p = _scores(n, seed=3)
        point = all_metrics(y, p, 0.5)
        ci = bootstrap_ci(y, p, 0.5, resamples=300, seed=0)
        for k, (lo, hi) in ci.items():
            assert lo <= point[k] <= hi, (n, k, lo, point[k], hi)
        widths[n] = {k: hi - lo for k, (lo, hi) in ci.items()}
    for k in widths[100]:
        assert widths[1600][k] < 0.5 * widths[100][k], k  # about 1/sqrt(16) in theory
    y, p = _scores(100, seed=3)
    assert bootstrap_ci(y, p, 0.5, 50, seed=7) == bootstrap_ci(y, p, 0.5, 50, seed=7)


def test_youden_threshold_maximises_j_on_the_data_given():
    y, p = _scores(400, seed=4)
    t = choose_threshold(y, p, "youden")
    j = lambda thr: np.mean(p[y == 1] >= thr) + np.mean(p[y == 0] < thr) - 1  # noqa: E731
    assert j(t) == pytest.approx(max(j(c) for c in np.unique(p)))


def test_sensitivity_threshold_is_the_highest_reaching_the_target():
    y, p = _scores(400, seed=5)
    t = choose_threshold(y, p, "sensitivity", target_sensitivity=0.9)
    assert np.mean(p[y == 1] >= t) >= 0.9
    higher = np.unique(p[p > t])[0]
    assert np.mean(p[y == 1] >= higher) < 0.9


def test_threshold_comes_from_val_only():
    """score() picks the threshold on val: changing test changes nothing about it."""
    from configs import default
    from fracture_jax.evaluate import score
    config = default.get_config()
    config.eval.bootstrap = 20
    val = _scores(200, seed=6)[::-1]  # (probs, labels)
    results = [score({"val": val, "test": _scores(200, seed=s, signal=sig)[::-1]}, config)
               for s, sig in ((7, 0.5), (8, 3.0))]
    expected = choose_threshold(val[1], val[0])
    for r in results:
        assert r["threshold"] == {"value": expected, "method": "youden", "chosen_on": "val"}
        assert r["test"]["operating"]["threshold"] == expected
        assert r["test"]["at_0.5"]["threshold"] == 0.5
    assert results[0]["test"]["operating"]["metrics"] != results[1]["test"]["operating"]["metrics"]
