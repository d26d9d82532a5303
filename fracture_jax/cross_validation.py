"""``--mode=cv``: stratified K-fold cross-validation over train+val, fold by fold resumable.

The images of train/ and val/ are pooled and split into ``data.folds`` folds, stratified by
label and grouped (``StratifiedGroupKFold``): images with the same bytes always share a fold,
and so do images with the same value of ``data.group_column`` in the metadata table (one
patient's images never straddle folds). For fold ``k``:

- its held-out fold is only scored: it is the fold run's ``test`` split, so its predictions are
  out-of-fold and no choice (early stopping, best epoch, threshold) saw them;
- the other folds are split again, the same way, into the fold's train and a val share of
  ``data.fold_val_share``, which early stopping and the operating threshold use;
- the run lives in ``<workdir>/cv/fold_<k>`` (its data folder of links to the images, its
  checkpoints, its eval report) and is marked done when scored, so a killed cross-validation
  resumes at the fold it was in, from that fold's last checkpoint.

Then ``<workdir>/cv`` gets the out-of-fold predictions of every image, per-fold metrics with
their mean and standard deviation, the pooled out-of-fold metrics with bootstrap intervals,
and, when the folder has a test/ split, that split scored by the fold ensemble (mean
probability) at the threshold chosen on the pooled out-of-fold predictions; ``report.html``
shows the table and the ROC curves.
"""

import copy
import csv
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from absl import logging
from sklearn.model_selection import StratifiedGroupKFold

from fracture_jax import clinical, parallel, plots, subgroups
from fracture_jax.data import dataset
from fracture_jax.data.pipeline import file_names
from fracture_jax.data.scan import CLASS_NAMES, scan_folder
from fracture_jax.data.synthetic import METADATA
from fracture_jax.errors import UserError
from fracture_jax.evaluate import evaluate, load_member, member_probabilities
from fracture_jax.files import write_csv, write_json
from fracture_jax.report import write_cv_report
from fracture_jax.scoring import (bootstrap, choose_threshold, ranking_metrics, score_split,
                                  threshold_metrics)
from fracture_jax.train import train_and_evaluate

FOLD_METRICS = ("roc_auc", "pr_auc", "recall", "specificity", "brier", "ece")


def _flat(rel: str) -> str:
    """A pooled image's file name inside a fold's data folder: its path, flattened."""
    return rel.replace("/", "__")


def _groups(config, root: str, files: list[str], digests: list[str]) -> np.ndarray:
    """A group id per image: the ``data.group_column`` value (else the image itself), merged
    across images with the same bytes."""
    column = config.data.group_column
    keys = list(files)
    if column:
        path = clinical.table_path(config.eval.metadata, root, METADATA)
        if path is None:
            raise UserError(f"data.group_column={column!r} needs a metadata table: set "
                            "--config.eval.metadata=<csv> (or put metadata.csv in the data "
                            "folder)")
        table = subgroups.read_table(path)
        if column not in next(iter(table.values()), {}):
            raise UserError(f"{path}: no column {column!r} to group the folds by")
        rows, missing = subgroups.match(table, files, path)
        if missing:
            logging.warning("%d images are not in %s: each is its own group", len(missing), path)
        keys = [f"{column}={r[column]}" if r is not None else f for f, r in zip(files, rows)]
    parent = {}  # union-find over group keys and image digests

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for key, digest in zip(keys, digests):
        parent[find(key)] = find(("bytes", digest))
    roots = [find(k) for k in keys]
    ids = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return np.array([ids[r] for r in roots])


def _split(labels, groups, n_splits: int, seed: int, what: str) -> list[np.ndarray]:
    """The held-out indices of each of ``n_splits`` stratified, grouped folds."""
    counts = np.bincount(labels, minlength=2)
    if n_splits < 2 or counts.min() < n_splits:
        raise UserError(f"{what}: {n_splits} folds need at least that many images of each class "
                        f"(have {counts[1]} fractured, {counts[0]} not fractured)")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels, groups)]


def plan_folds(config, root: str, pool: list) -> list[dict]:
    """For each fold, the pooled indices of its train, val and held-out (test) images."""
    labels = np.array([label for _, label, _ in pool])
    if len({_flat(rel) for rel, _, _ in pool}) < len(pool):
        raise UserError(f"{root}: two image paths flatten to the same name ('/' -> '__'); "
                        "rename the files that contain '__'")
    groups = _groups(config, root, [rel for rel, _, _ in pool], [d for _, _, d in pool])
    k = config.data.folds
    held = _split(labels, groups, k, config.seed, f"data.folds={k}")
    inner_k = max(2, round(1 / config.data.fold_val_share))
    plan = []
    for i, out in enumerate(held):
        rest = np.setdiff1d(np.arange(len(pool)), out)
        val = rest[_split(labels[rest], groups[rest], inner_k, config.seed + 1 + i,
                          f"fold {i}'s val share")[0]]
        plan.append({"train": np.setdiff1d(rest, val), "val": val, "test": out})
    return plan


def _link(target: Path, link: Path):
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    try:
        os.symlink(target, link)
    except OSError:  # a file system without links: a copy
        shutil.copy2(target, link)


def _write_fold_folder(folder: Path, root: Path, pool: list, fold: dict):
    for split, indices in fold.items():
        for i in indices:
            rel, label, _ = pool[i]
            _link(root / rel, folder / split / CLASS_NAMES[label] / _flat(rel))


def _fold_config(config, data_root: str):
    c = copy.deepcopy(config)
    with c.unlocked():
        c.data.root, c.data.synthetic, c.data.prepared_dir = data_root, False, ""
        c.eval.output_dir, c.eval.metadata, c.eval.boxes = "", "", ""
    return c


def cross_validate(config, workdir: str) -> dict:
    """Train and score every fold (those done are kept), then pool them; the CV metrics."""
    root = Path(dataset.data_root(config, workdir)).expanduser().resolve()
    scan = scan_folder(root)
    pool = scan.examples["train"] + scan.examples["val"]
    test = scan.examples.get("test", [])
    cv_dir = Path(workdir) / "cv"
    with parallel.first_process_first("fracture_jax: cv planned"):  # made once, then read
        plan = _stored_plan(cv_dir, config, root, pool)
        for k, fold in enumerate(plan):
            _write_fold_folder(cv_dir / f"fold_{k}" / "data", root, pool, fold)
        for rel, label, _ in test:
            _link(root / rel, cv_dir / "test_data" / "test" / CLASS_NAMES[label] / _flat(rel))
    test_source = _test_source(config, cv_dir) if test else None
    _compile_once(cv_dir)
    for k, fold in enumerate(plan):
        fold_dir = cv_dir / f"fold_{k}"
        if (fold_dir / "done").is_file():
            logging.info("fold %d (%d of %d): done before, kept", k, k + 1, len(plan))
            continue
        logging.info("fold %d (%d of %d): %d train, %d val, %d held out", k, k + 1, len(plan),
                     *(len(fold[s]) for s in ("train", "val", "test")))
        fold_config = _fold_config(config, str(fold_dir / "data"))
        train_and_evaluate(fold_config, str(fold_dir))
        evaluate(fold_config, str(fold_dir))
        if test_source is not None:
            _predict_test(config, fold_dir, test_source)
        (fold_dir / "done").write_text("scored\n")  # by every process: each decides to skip
    if jax.process_index() == 0:  # the folds' reports are written by process 0
        return summarise(config, cv_dir, pool, test, plan)
    return {}


def _compile_once(cv_dir: Path):
    """Keep compiled programs in ``cv/xla_cache`` (JAX's persistent cache, unless one is set):
    every fold compiles the same train and eval steps, so folds after the first (and a resumed
    cross-validation) load them instead of compiling again."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cv_dir / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _test_source(config, cv_dir: Path):
    """The folder's test split (``cv/test_data``, links to its images), decoded once for
    every fold model, in ``cv/prepared``."""
    on_test = _fold_config(config, str(cv_dir / "test_data"))
    _, sources = dataset.load(on_test, str(cv_dir), dataset.decoded_side(config),
                              cv_dir / "prepared", required=())
    return sources["test"]


def _predict_test(config, fold_dir: Path, source):
    """The fold model's probability for every test image, in ``fold_<k>/test_predictions.csv``."""
    member = load_member(str(fold_dir))
    probs, _ = member_probabilities(member, {"test": source}, config, parallel.make_mesh())
    p, labels = probs["test"]
    if jax.process_index() == 0:
        write_csv(fold_dir / "test_predictions.csv", ["file", "label", member.name],
                  ([name, int(labels[i]), f"{p[i]:.6f}"]
                   for i, name in enumerate(file_names(source))))


def _stored_plan(cv_dir: Path, config, root: Path, pool: list) -> list[dict]:
    """The fold plan, made once and kept in ``folds.json``: a resumed cross-validation uses
    the same folds, and one over changed data or other fold settings is refused."""
    path = cv_dir / "folds.json"
    settings = {"folds": config.data.folds, "group_column": config.data.group_column,
                "fold_val_share": config.data.fold_val_share, "seed": config.seed}
    files = [rel for rel, _, _ in pool]
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["files"] != files:
            raise UserError(f"{path} was planned for other images: those under train/ and val/ "
                            "changed since. Cross-validate into a new --workdir")
        changed = [f"{k}: {stored.get(k)!r}, now {v!r}" for k, v in settings.items()
                   if stored.get(k) != v]
        if changed:
            raise UserError(f"{path} was planned with other settings ({'; '.join(changed)}): "
                            "set them back, or cross-validate into a new --workdir")
        return [{s: np.asarray(v, int) for s, v in fold.items()} for fold in stored["plan"]]
    plan = plan_folds(config, str(root), pool)
    cv_dir.mkdir(parents=True, exist_ok=True)
    write_json(str(path), settings | {"files": files, "plan": [
        {s: v.tolist() for s, v in f.items()} for f in plan]})
    return plan


def _read_predictions(path: Path) -> dict:
    """{flattened file name: probability} of a fold's predictions CSV (one model)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if len(header) != 3:
            raise UserError(f"{path}: expected one model's column, found {header[2:]}")
        return {row[0].split("/")[-1]: float(row[2]) for row in reader}


def pooled_metrics(labels, probs, decisions, resamples: int, seed: int) -> dict:
    """Ranking metrics of the pooled out-of-fold probabilities and threshold metrics of their
    decisions (each at its fold's threshold), with bootstrap 95% intervals."""
    def stats(weights=None):
        return ranking_metrics(labels, probs, weights) | threshold_metrics(
            labels, decisions.astype(float), 0.5, weights)

    return {"n": len(labels), "positives": int(labels.sum()), "metrics": stats(),
            "ci95": bootstrap(len(labels), stats, resamples, seed)}


def summarise(config, cv_dir: Path, pool: list, test: list, plan: list) -> dict:
    """The CV metrics, predictions and report from the folds' eval outputs."""
    labels = np.array([label for _, label, _ in pool])
    probs, fold_of = np.full(len(pool), np.nan), np.full(len(pool), -1)
    decisions = np.zeros(len(pool), bool)
    per_fold, test_probs = [], []
    for k, fold in enumerate(plan):
        fold_dir = cv_dir / f"fold_{k}"
        metrics = json.loads((fold_dir / "eval" / "metrics.json").read_text())
        result = metrics["results"][metrics["primary"]]
        scored = _read_predictions(fold_dir / "eval" / "predictions_test.csv")
        threshold = result["threshold"]["value"]
        for i in fold["test"]:
            probs[i], fold_of[i] = scored[_flat(pool[i][0])], k
            decisions[i] = probs[i] >= threshold
        m = result["test"]["operating"]["metrics"]
        per_fold.append({"fold": k, "train": len(fold["train"]), "val": len(fold["val"]),
                         "n": len(fold["test"]), "positives": int(labels[fold["test"]].sum()),
                         "threshold": threshold} | {name: m[name] for name in FOLD_METRICS})
        if test:
            on_test = _read_predictions(fold_dir / "test_predictions.csv")
            test_probs.append([on_test[_flat(rel)] for rel, _, _ in test])
    e = config.eval
    table = np.array([[f[name] for name in FOLD_METRICS] for f in per_fold], np.float64)
    out = {"folds": len(plan), "group_column": config.data.group_column or None,
           "fold_val_share": config.data.fold_val_share, "per_fold": per_fold,
           "mean": dict(zip(FOLD_METRICS, np.nanmean(table, axis=0).tolist())),
           "std": dict(zip(FOLD_METRICS, np.nanstd(table, axis=0, ddof=1).tolist())),
           "bootstrap": {"resamples": e.bootstrap, "seed": config.seed, "level": 0.95},
           "out_of_fold": pooled_metrics(labels, probs, decisions, e.bootstrap, config.seed)}
    curves = {f"fold {k}": (labels[f["test"]], probs[f["test"]]) for k, f in enumerate(plan)}
    curves["pooled out-of-fold"] = (labels, probs)
    write_csv(cv_dir / "oof_predictions.csv", ["file", "label", "fold", "probability"],
              [[rel, label, fold_of[i], f"{probs[i]:.6f}"]
               for i, (rel, label, _) in enumerate(pool)])
    if test:
        test_labels = np.array([label for _, label, _ in test])
        ensemble = np.mean(test_probs, axis=0)
        threshold = choose_threshold(labels, probs, e.threshold, e.target_sensitivity)
        out["test_ensemble"] = score_split(test_labels, ensemble, threshold, e.bootstrap,
                                           config.seed) | {
            "threshold_chosen_on": "pooled out-of-fold predictions", "method": e.threshold}
        curves["test, fold ensemble"] = (test_labels, ensemble)
        write_csv(cv_dir / "predictions_test.csv",
                  ["file", "label", *(f"fold_{k}" for k in range(len(plan))), "ensemble"],
                  [[rel, label, *(f"{p[j]:.6f}" for p in test_probs), f"{ensemble[j]:.6f}"]
                   for j, (rel, label, _) in enumerate(test)])
    write_json(str(cv_dir / "metrics.json"), out)
    figure = plots.roc_curves(curves, str(cv_dir / "roc_folds.png"))
    page = write_cv_report(str(cv_dir / "report.html"), out,
                           {"ROC curves: each fold's held-out images, pooled, test": figure})
    print(f"cross-validation done: report {page}, metrics {cv_dir / 'metrics.json'}")
    return out

