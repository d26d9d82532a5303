"""The report's figures as PNG files (matplotlib, no display needed)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from fracture_jax.scoring import CLASS_NAMES, reliability  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_plot(history: list[dict], path: str) -> str:
    """Loss, accuracy and AUROC per epoch, train and val."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(axes, ("loss", "accuracy", "auroc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(epochs, [h.get(f"{split}_{metric}", np.nan) for h in history], style,
                    label=split, markersize=4)
        ax.set(xlabel="epoch", title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def confusion_plot(matrix, path: str, title: str) -> str:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > m.max() / 2 else "black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
           xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def roc_pr_plot(labels, probs, threshold: float, path: str, title: str) -> str:
    """ROC and precision-recall curves, the operating threshold marked on both."""
    y, p = np.asarray(labels), np.asarray(probs)
    pred = p >= threshold
    tpr = pred[y == 1].mean()
    fpr = pred[y == 0].mean()
    precision = y[pred].mean() if pred.any() else 1.0
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    f, t, _ = skm.roc_curve(y, p)
    a.plot(f, t, label=f"AUC {skm.roc_auc_score(y, p):.3f}")
    a.plot([0, 1], [0, 1], "k:", lw=1)
    a.plot(fpr, tpr, "ro", label=f"threshold {threshold:.3f}")
    a.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {title}")
    r_prec, r_rec, _ = skm.precision_recall_curve(y, p)
    b.plot(r_rec, r_prec, label=f"AP {skm.average_precision_score(y, p):.3f}")
    b.axhline(y.mean(), color="k", ls=":", lw=1, label=f"prevalence {y.mean():.2f}")
    b.plot(tpr, precision, "ro", label=f"threshold {threshold:.3f}")
    b.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"precision-recall, {title}")
    for ax in (a, b):
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is a else "lower left")
    return _save(fig, path)


def roc_curves(curves: dict, path: str) -> str:
    """ROC curves ``{name: (labels, probabilities)}`` on one axis, each with its AUC."""
    fig, ax = plt.subplots(figsize=(5.6, 5))
    for name, (y, p) in curves.items():
        f, t, _ = skm.roc_curve(y, p)
        pooled = not name.startswith("fold")
        ax.plot(f, t, lw=2.2 if pooled else 1, alpha=1 if pooled else 0.6,
                label=f"{name} (AUC {skm.roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title="ROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability_plot(labels, probs, ece: float, path: str, title: str) -> str:
    """Fraction fractured against mean predicted probability per bin, with bin counts."""
    conf, frac, count = reliability(labels, probs)
    fig, (a, b) = plt.subplots(2, 1, figsize=(4.8, 5.4), height_ratios=[3, 1], sharex=True)
    a.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    a.plot(conf, frac, "o-", label=f"model (ECE {ece:.3f})")
    a.set(ylabel="fraction fractured", title=f"reliability, {title}", ylim=(-0.02, 1.02))
    a.grid(alpha=0.3)
    a.legend(loc="upper left")
    b.bar(conf, count, width=0.05)
    b.set(xlabel="predicted probability of fractured", ylabel="images", xlim=(-0.02, 1.02))
    return _save(fig, path)


def image_grid(images, captions: list[str], path: str, heat=None, cols: int = 4,
               colors: list[str] | None = None, boxes: list | None = None) -> str:
    """Images (N, H, W, 3) 0-255 with captions; ``heat`` (N, H, W) in [0, 1] is overlaid, and
    ``boxes`` (per image, ``[x_min, y_min, x_max, y_max]`` in its pixels) drawn."""
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.25 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(np.clip(np.asarray(images[k]), 0, 255).astype(np.uint8))
        if heat is not None:
            ax.imshow(np.asarray(heat[k]), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        for x0, y0, x1, y1 in (boxes[k] if boxes else []):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="white", linewidth=1.5))
        ax.set_title(captions[k], fontsize=9, color=colors[k] if colors else "black")
    return _save(fig, path)


def lr_find_plot(lrs, losses, smoothed, suggested: float, path: str) -> str:
    """The learning-rate range test: loss against rate (log scale), the suggestion marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(lrs, losses, ".", alpha=0.4, label="loss")
    ax.plot(lrs, smoothed, "-", label="smoothed")
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="train loss",
           title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
