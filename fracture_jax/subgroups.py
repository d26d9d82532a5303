"""Where the model fails: metrics per subgroup of a metadata table, and a shortcut audit.

A metadata table is a CSV keyed by ``file``, the image's path relative to the data root (as
FracAtlas' ``metadata.csv`` and the phantoms' are), with any categorical columns. For every
column and value: n, positives, ROC AUC, sensitivity and specificity at the operating threshold,
each with its bootstrap 95% interval (``scoring.bootstrap``), and a flag where the interval
lies wholly below the overall point estimate. A metric needs ``min_class`` images of each class
it depends on; below that the table says "too small" instead of a number.
"""

import csv
import os

import numpy as np

from fracture_jax.errors import UserError
from fracture_jax.scoring import bootstrap, threshold_metrics, weighted_roc_auc

SKIPPED_COLUMNS = ("file", "split", "label")  # the layout already says these
MAX_VALUES = 20  # a column with more distinct values is an identifier, not a subgroup
ABSENT = ("", "0", "no", "false", "none", "absent")  # shortcut column values meaning "without"
METRICS = {"roc_auc": "both", "sensitivity": "fractured", "specificity": "not fractured"}


def read_table(path: str) -> dict[str, dict[str, str]]:
    """``{file: {column: value}}`` of a CSV keyed by a ``file`` column."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (the table of per-image attributes)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise UserError(f"{path}: no 'file' column; the first row must name the columns, "
                            "one of them 'file' (the image's path relative to the data root)")
        return {table_key(row["file"]): {k: (v or "").strip() for k, v in row.items() if k}
                for row in reader}


def table_key(path: str) -> str:
    """A table's ``file`` as the data set names it: forward slashes, no leading ``./``."""
    return path.strip().replace("\\", "/").removeprefix("./")


def match(table: dict, files: list[str], path: str) -> tuple[list, list[str]]:
    """(each file's row or None, the files the table lacks). A table that matches none of the
    files is an error showing an example of each side's paths."""
    rows = [table.get(table_key(f)) for f in files]
    missing = [f for f, r in zip(files, rows) if r is None]
    if files and len(missing) == len(files):
        raise UserError(f"{path}: no row matches an evaluated image; its 'file' column must be "
                        f"the path relative to the data root (table: {next(iter(table), '-')!r}, "
                        f"images: {files[0]!r})")
    return rows, missing


def subgroup_metrics(labels, probs, threshold: float, weights=None) -> dict:
    """ROC AUC, sensitivity and specificity at ``threshold`` (NaN where undefined); with
    ``weights`` (R, n), arrays (R,) for every bootstrap resample at once."""
    at = threshold_metrics(labels, probs, threshold, weights)
    auc = weighted_roc_auc(labels, probs, np.ones((1, len(labels))) if weights is None
                           else weights)
    return {"roc_auc": float(auc[0]) if weights is None else auc,
            "sensitivity": at["recall"], "specificity": at["specificity"]}


def score_group(labels, probs, threshold: float, resamples: int, seed: int, min_class: int,
                overall: dict | None = None) -> dict:
    """One group's n, positives, metrics with 95% intervals, the metrics it is too small for
    (and why), and those whose interval lies wholly below ``overall``'s point estimate."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    pos = int(labels.sum())
    counts = {"fractured": pos, "not fractured": len(labels) - pos}
    short = {}
    for name, needs in METRICS.items():
        for cls in (("fractured", "not fractured") if needs == "both" else (needs,)):
            if counts[cls] < min_class:
                short[name] = (f"undefined: no {cls} images" if not counts[cls] else
                               f"too small: {counts[cls]} {cls} (needs {min_class})")
                break
    out = {"n": len(labels), "positives": pos, "metrics": {}, "ci95": {}, "too_small": short,
           "below_overall": []}
    if len(short) == len(METRICS):
        return out
    point = subgroup_metrics(labels, probs, threshold)
    ci = bootstrap(len(labels), lambda w: subgroup_metrics(labels, probs, threshold, w),
                   resamples, seed)
    for name in METRICS:
        if name in short:
            continue
        out["metrics"][name], out["ci95"][name] = point[name], ci[name]
        if overall is not None and ci[name][1] < overall[name]:
            out["below_overall"].append(name)
    return out


def subgroups(labels, probs, files: list[str], table: dict, path: str, threshold: float,
              resamples: int, seed: int, min_class: int, columns: tuple = ()) -> dict:
    """Every column's every value scored (``score_group``) against the overall metrics, with
    the files the table lacks listed and the columns left out said."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    rows, missing = match(table, files, path)
    overall = score_group(labels, probs, threshold, resamples, seed, min_class)
    header = list(next(iter(table.values()), {}))
    names = list(columns) or [c for c in header if c not in SKIPPED_COLUMNS]
    result = {"table": path, "threshold": threshold, "min_class": min_class,
              "overall": overall, "columns": {}, "skipped_columns": {},
              "missing": {"count": len(missing), "files": missing}}
    for column in names:
        if column not in header:
            raise UserError(f"{path}: no column {column!r} (it has {', '.join(header)})")
        values = np.array([r[column] if r is not None else None for r in rows], object)
        distinct = sorted({v for v in values if v is not None})
        if len(distinct) > MAX_VALUES:
            result["skipped_columns"][column] = f"{len(distinct)} values: not categorical"
            continue
        result["columns"][column] = {
            value: score_group(labels[values == value], probs[values == value], threshold,
                               resamples, seed, min_class, overall["metrics"])
            for value in distinct}
    return result


def present(value) -> bool:
    """Whether a shortcut column's value marks the shortcut as there (1, yes, plate...)."""
    return value is not None and str(value).strip().lower() not in ABSENT


def shortcut_audit(labels, probs, files: list[str], table: dict, path: str, column: str,
                   threshold: float, resamples: int, seed: int, min_class: int,
                   overall: dict) -> dict:
    """The metrics on all images (``overall``, ``score_group``'s of them), on those without the
    suspected shortcut ``column`` and on those with it (files the table lacks count as
    neither)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    rows, _ = match(table, files, path)
    known = np.array([r is not None for r in rows])
    has = np.array([r is not None and present(r.get(column)) for r in rows])
    return {"column": column, "threshold": threshold, "all": overall,
            "without": score_group(labels[known & ~has], probs[known & ~has], threshold,
                                   resamples, seed, min_class, overall["metrics"]),
            "with": score_group(labels[has], probs[has], threshold, resamples, seed, min_class,
                                overall["metrics"])}
