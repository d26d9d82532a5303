"""Clinical scoring of binary predictions: metrics at a threshold, calibration, bootstrap
confidence intervals and the choice of an operating threshold on validation data.

Every metric takes integer example weights, so a bootstrap resample (examples drawn with
replacement) is the same call with multinomial counts as weights: no copies of the data.
"""

import numpy as np
from sklearn import metrics as skm

from fracture_jax.data.scan import CLASS_NAMES  # label 0, label 1

ECE_BINS = 15


def _bin_of(probs, bins: int) -> np.ndarray:
    """Equal-width bin of each probability: [0, 1/B), ..., [(B-1)/B, 1]."""
    return np.clip((probs * bins).astype(int), 0, bins - 1)


def expected_calibration_error(labels, probs, bins: int = ECE_BINS, weights=None) -> float:
    """Sum over equal-width probability bins of |fraction positive - mean probability|,
    weighted by each bin's share of the examples."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    idx = _bin_of(p, bins)
    count = np.bincount(idx, w, bins)
    gap = np.abs(np.bincount(idx, w * y, bins) - np.bincount(idx, w * p, bins))
    return float(gap.sum() / count.sum())


def reliability(labels, probs, bins: int = ECE_BINS):
    """(mean probability, fraction positive, count) of each non-empty bin, for the diagram."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    idx = _bin_of(p, bins)
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    return (np.bincount(idx, p, bins)[keep] / count[keep],
            np.bincount(idx, y, bins)[keep] / count[keep], count[keep])


def _ratio(a, b) -> float:
    return float(a / b) if b > 0 else float("nan")


def threshold_metrics(labels, probs, threshold: float, weights=None) -> dict:
    """Metrics of the decision ``prob >= threshold``: the confusion counts and their ratios."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    tp, fp = w[pred & y].sum(), w[pred & ~y].sum()
    fn, tn = w[~pred & y].sum(), w[~pred & ~y].sum()
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(tp + tn, w.sum()), "precision": precision,
            "recall": recall, "specificity": _ratio(tn, tn + fp),
            "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def ranking_metrics(labels, probs, weights=None) -> dict:
    """Threshold-free metrics: ROC AUC, PR AUC (average precision), Brier score and ECE."""
    y, p = np.asarray(labels), np.asarray(probs, np.float64)
    w = None if weights is None else np.asarray(weights, np.float64)
    both = len(np.unique(y if w is None else y[w > 0])) == 2
    return {"roc_auc": float(skm.roc_auc_score(y, p, sample_weight=w)) if both else float("nan"),
            "pr_auc": float(skm.average_precision_score(y, p, sample_weight=w))
            if both else float("nan"),
            "brier": float(skm.brier_score_loss(y, p, sample_weight=w)),
            "ece": expected_calibration_error(y, p, weights=w)}


def all_metrics(labels, probs, threshold: float, weights=None) -> dict:
    return ranking_metrics(labels, probs, weights) | threshold_metrics(labels, probs, threshold,
                                                                        weights)


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) bootstrap weights: row ``r`` is the ``r``-th draw of
    ``numpy.random.default_rng(seed).multinomial(n, [1/n] * n)``."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def percentile_interval(values, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of the finite ``values`` (NaN, NaN if none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])] if values.size \
        else [float("nan")] * 2


def bootstrap(n: int, statistics, resamples: int = 1000, seed: int = 0, level: float = 0.95,
              batched: bool = False) -> dict:
    """Percentile intervals ``{name: [low, high]}`` of ``statistics(weights)`` (a dict) over
    the ``resample_weights``; ``batched``: it takes all the weights (R, n) at once and gives
    arrays (R,). Resamples where a statistic is undefined (NaN) drop out of its interval."""
    weights = resample_weights(n, resamples, seed)
    if batched:
        draws = statistics(weights)
        return {k: percentile_interval(v, level) for k, v in draws.items()}
    draws = [statistics(w) for w in weights]
    return {k: percentile_interval([d[k] for d in draws], level) for k in draws[0]}


def weighted_roc_auc(labels, probs, weights) -> np.ndarray:
    """ROC AUC under each row of ``weights`` (R, n) at once: the weighted probability that a
    fractured image scores above a not-fractured one, ties counting a half (what
    scikit-learn's ``roc_auc_score`` with ``sample_weight`` gives); NaN where a row leaves
    one class only."""
    y = np.asarray(labels).astype(bool)
    order = np.argsort(np.asarray(probs), kind="stable")
    p, y = np.asarray(probs)[order], y[order]
    w = np.asarray(weights, np.float64)[:, order]
    pos, neg = w * y, w * ~y
    cum = np.cumsum(neg, axis=1)
    first = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # each run of equal scores' start
    group = np.cumsum(np.r_[True, p[1:] != p[:-1]]) - 1
    start, end = first[group], np.r_[first[1:] - 1, len(p) - 1][group]
    below = cum[:, start] - neg[:, start]  # negatives strictly below each score
    tied = cum[:, end] - below
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * tied)).sum(axis=1) / total, np.nan)


def bootstrap_ci(labels, probs, threshold: float, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, metrics=all_metrics) -> dict:
    """``bootstrap`` intervals of ``metrics(labels, probs, threshold, weights)``; the
    threshold stays fixed, as it was chosen elsewhere."""
    return bootstrap(len(labels), lambda w: metrics(labels, probs, threshold, w), resamples,
                     seed, level)


def confusion(labels, probs, threshold: float) -> list[list[int]]:
    """[[TN, FP], [FN, TP]] (rows: true class, columns: predicted), as scikit-learn orders it."""
    pred = (np.asarray(probs) >= threshold).astype(int)
    return skm.confusion_matrix(np.asarray(labels).astype(int), pred, labels=[0, 1]).tolist()


def choose_threshold(labels, probs, method: str = "youden", target_sensitivity: float = 0.9
                     ) -> float:
    """An operating threshold from (validation) data: the ROC point maximising Youden's J =
    sensitivity + specificity - 1, or the highest threshold reaching ``target_sensitivity``."""
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if method == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if method == "sensitivity":
        return float(thresholds[np.argmax(tpr >= target_sensitivity)])
    raise ValueError(f"threshold method {method!r}: use youden or sensitivity")


def score_split(labels, probs, threshold: float, resamples: int, seed: int) -> dict:
    """Everything reported for one split at one threshold: metrics, 95% CIs, confusion matrix
    and scikit-learn's classification report."""
    pred = (np.asarray(probs) >= threshold).astype(int)
    return {"threshold": float(threshold), "n": int(len(labels)),
            "positives": int(np.sum(labels)),
            "metrics": all_metrics(labels, probs, threshold),
            "ci95": bootstrap_ci(labels, probs, threshold, resamples, seed),
            "confusion_matrix": confusion(labels, probs, threshold),
            "classification_report": skm.classification_report(
                np.asarray(labels).astype(int), pred, labels=[0, 1], target_names=CLASS_NAMES,
                output_dict=True, zero_division=0)}
