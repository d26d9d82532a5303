"""``--mode=inspect``: the data summary (counts, skipped files, duplicates) and a sample grid."""

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fracture_jax.data import dataset  # noqa: E402
from fracture_jax.data.scan import CLASS_NAMES  # noqa: E402
from fracture_jax.files import atomic_path, write_json  # noqa: E402


def summary(report) -> str:
    lines = [f"data folder {report.root}"]
    spellings = {k: v for k, v in report.folders.items() if k != v}
    if spellings:
        lines.append("folder spellings used: " + ", ".join(f"{v} as {k}" for k, v in spellings.items()))
    for split, counts in report.counts().items():
        lines.append(f"  {split:6s} " + "  ".join(f"{c}: {n}" for c, n in counts.items()))
    lines.append(f"skipped files: {len(report.skipped)}")
    lines += [f"  {rel}: {reason}" for rel, reason in report.skipped]
    lines.append(f"duplicate groups (same bytes): {len(report.duplicates)}, "
                 f"of which across splits (leakage): {len(report.leakage)}")
    lines += [f"  leakage: {', '.join(g)}" for g in report.leakage]
    return "\n".join(lines)


def sample_grid(sources, path: str, per_class: int = 6, seed: int = 0):
    """A PNG with ``per_class`` train images of each class (as stored for the model), one row
    per class."""
    src = sources["train"]
    labels = src.labels
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(2, per_class, figsize=(2 * per_class, 4.4), squeeze=False)
    for label, cls in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(labels == label)
        for ax, i in zip(axes[label], rng.choice(idx, min(per_class, len(idx)), replace=False)):
            ax.imshow(src[int(i)]["image"])
            ax.set_title(cls, fontsize=8)
        for ax in axes[label]:
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def inspect_dataset(config, workdir: str):
    report, sources = dataset.load(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    print(summary(report))
    grid = os.path.join(workdir, "samples.png")
    sample_grid(sources, grid, seed=config.seed)
    write_json(os.path.join(workdir, "data_summary.json"),
               {"root": report.root, "counts": report.counts(), "skipped": report.skipped,
                "duplicates": report.duplicates, "leakage": report.leakage})
    print(f"sample grid: {grid}")
