"""Per-epoch classification metrics from probabilities (scikit-learn)."""

import numpy as np
from sklearn.metrics import roc_auc_score


def bce(logits, labels) -> float:
    """Mean binary cross-entropy of logits, computed stably."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def epoch_metrics(logits, labels, prefix: str) -> dict:
    """Loss, accuracy at 0.5 and AUROC (NaN when only one class is present)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    auroc = roc_auc_score(labels, logits) if len(np.unique(labels)) == 2 else float("nan")
    return {f"{prefix}_loss": bce(logits, labels),
            f"{prefix}_accuracy": float(np.mean((logits > 0) == (labels == 1))),
            f"{prefix}_auroc": float(auroc)}
