"""Clinical scoring of binary predictions: metrics at a threshold, calibration, bootstrap
confidence intervals and the choice of an operating threshold on validation data.

Every metric takes integer example weights, so a bootstrap resample (examples drawn with
replacement) is the same call with multinomial counts as weights: no copies of the data. A
matrix of weights, one row per resample, computes a chunk of resamples at once (numpy, equal to
scikit-learn's weighted metrics to 1e-15; 1,000 resamples of 1,500 images in 0.7 s against
6.7 s one scikit-learn call at a time).
"""

import numpy as np
from sklearn import metrics as skm

from fracture_jax.data.scan import CLASS_NAMES  # label 0, label 1

ECE_BINS = 15


def _bin_of(probs, bins: int) -> np.ndarray:
    """Equal-width bin of each probability: [0, 1/B), ..., [(B-1)/B, 1]."""
    return np.clip((probs * bins).astype(int), 0, bins - 1)


def _rows(weights, n: int):
    """``weights`` as (R, n) float64 and whether one row was asked for (None: all ones)."""
    if weights is None:
        return np.ones((1, n)), True
    w = np.asarray(weights, np.float64)
    return (w[None], True) if w.ndim == 1 else (w, False)


def _result(values: dict, single: bool) -> dict:
    return {k: float(v[0]) for k, v in values.items()} if single else values


def _ratio(a, b):
    """a / b, NaN where b is 0 (elementwise)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def expected_calibration_error(labels, probs, bins: int = ECE_BINS, weights=None):
    """Sum over equal-width probability bins of |fraction positive - mean probability|,
    weighted by each bin's share of the examples (for each row of a (R, n) ``weights``)."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    w, single = _rows(weights, len(p))
    onehot = np.eye(bins)[_bin_of(p, bins)]  # (n, bins)
    gap = np.abs(w @ (onehot * (y - p)[:, None])).sum(axis=1)
    ece = gap / w.sum(axis=1)
    return float(ece[0]) if single else ece


def reliability(labels, probs, bins: int = ECE_BINS):
    """(mean probability, fraction positive, count) of each non-empty bin, for the diagram."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    idx = _bin_of(p, bins)
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    return (np.bincount(idx, p, bins)[keep] / count[keep],
            np.bincount(idx, y, bins)[keep] / count[keep], count[keep])


def threshold_metrics(labels, probs, threshold: float, weights=None) -> dict:
    """Metrics of the decision ``prob >= threshold``: the confusion counts' ratios (arrays (R,)
    for a (R, n) ``weights``, one value each otherwise)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    w, single = _rows(weights, len(y))
    tp, fp, fn, tn = (w @ m.astype(np.float64)
                      for m in (pred & y, pred & ~y, ~pred & y, ~pred & ~y))
    return _result({"accuracy": _ratio(tp + tn, w.sum(axis=1)), "precision": _ratio(tp, tp + fp),
                    "recall": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                    "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)},
                   single)


def _runs(sorted_scores) -> tuple[np.ndarray, np.ndarray]:
    """For each position of sorted scores, the first and last index of its run of ties."""
    new = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    first = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    return first[group], np.r_[first[1:] - 1, len(sorted_scores) - 1][group]


def weighted_roc_auc(labels, probs, weights) -> np.ndarray:
    """ROC AUC under each row of ``weights`` (R, n) at once: the weighted probability that a
    fractured image scores above a not-fractured one, ties counting a half (what
    scikit-learn's ``roc_auc_score`` with ``sample_weight`` gives); NaN where a row leaves
    one class only."""
    order = np.argsort(np.asarray(probs), kind="stable")
    p, y = np.asarray(probs)[order], np.asarray(labels).astype(bool)[order]
    w = np.asarray(weights, np.float64)[:, order]
    pos, neg = w * y, w * ~y
    cum = np.cumsum(neg, axis=1)
    start, end = _runs(p)
    below = cum[:, start] - neg[:, start]  # negatives strictly below each score
    tied = cum[:, end] - below
    return _ratio((pos * (below + 0.5 * tied)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))


def weighted_average_precision(labels, probs, weights) -> np.ndarray:
    """Average precision (scikit-learn's: recall steps times the precision at each distinct
    score, highest first) under each row of ``weights`` (R, n); NaN where no positive."""
    order = np.argsort(-np.asarray(probs, np.float64), kind="stable")
    p, y = np.asarray(probs)[order], np.asarray(labels).astype(bool)[order]
    w = np.asarray(weights, np.float64)[:, order]
    ends = np.unique(_runs(p)[1])
    tps, fps = np.cumsum(w * y, axis=1)[:, ends], np.cumsum(w * ~y, axis=1)[:, ends]
    gain = np.diff(tps, axis=1, prepend=0.0)
    precision = np.nan_to_num(_ratio(tps, tps + fps))
    return np.maximum(_ratio((gain * precision).sum(axis=1), tps[:, -1]), 0.0)


def ranking_metrics(labels, probs, weights=None) -> dict:
    """Threshold-free metrics: ROC AUC, PR AUC (average precision), Brier score and ECE
    (arrays (R,) for a (R, n) ``weights``, one value each otherwise); the AUCs are NaN where
    one class is left."""
    y, p = np.asarray(labels).astype(bool), np.asarray(probs, np.float64)
    w, single = _rows(weights, len(p))
    both = ((w @ y) > 0) & ((w @ ~y) > 0)
    return _result({"roc_auc": np.where(both, weighted_roc_auc(y, p, w), np.nan),
                    "pr_auc": np.where(both, weighted_average_precision(y, p, w), np.nan),
                    "brier": (w @ (p - y) ** 2) / w.sum(axis=1),
                    "ece": expected_calibration_error(y, p, weights=w)}, single)


def all_metrics(labels, probs, threshold: float, weights=None) -> dict:
    return ranking_metrics(labels, probs, weights) | threshold_metrics(labels, probs, threshold,
                                                                        weights)


CHUNK_ELEMENTS = 1 << 22  # resample weights held at once (32 MiB of float64)


def resample_weights(n: int, resamples: int, seed: int):
    """The bootstrap weights in chunks of rows (R_i, n): row ``r`` overall is the ``r``-th draw
    of ``numpy.random.default_rng(seed).multinomial(n, [1/n] * n)``."""
    rng, rows = np.random.default_rng(seed), max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, rows):
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=min(rows, resamples - start))


def percentile_interval(values, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of the finite ``values`` (NaN, NaN if none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])] if values.size \
        else [float("nan")] * 2


def bootstrap(n: int, statistics, resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """Percentile intervals ``{name: [low, high]}`` of ``statistics(weights)``, which takes a
    chunk of ``resample_weights`` (R_i, n) and gives ``{name: (R_i,)}``. Resamples where a
    statistic is undefined (NaN) drop out of its interval."""
    draws = [statistics(w) for w in resample_weights(n, resamples, seed)]
    return {k: percentile_interval(np.concatenate([d[k] for d in draws]), level)
            for k in draws[0]}


def bootstrap_ci(labels, probs, threshold: float, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """``bootstrap`` intervals of ``all_metrics`` (a chunk of resamples at a time); the
    threshold stays fixed, as it was chosen elsewhere."""
    return bootstrap(len(labels), lambda w: all_metrics(labels, probs, threshold, w),
                     resamples, seed, level)


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
