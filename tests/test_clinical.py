"""The clinical evaluation: subgroup tables and the shortcut audit, Grad-CAM scored against the
fracture boxes, and --mode=cv. Every number of the new metrics.json sections is recomputed
here from the prediction CSVs and the metadata and box files with scikit-learn and numpy."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from conftest import REPO
from fracture_jax.clinical import heat_maps
from fracture_jax.cross_validation import plan_folds
from fracture_jax.data.scan import scan_folder
from fracture_jax.data.synthetic import BOXES, METADATA, write_phantoms
from fracture_jax.errors import UserError
from fracture_jax.evaluate import load_member
from fracture_jax.localization import box_mask, score_maps
from fracture_jax.subgroups import subgroups
from test_eval import CHROMIUM_FLAGS, _chromium
from test_resume import _leftovers
from test_train import tiny_config

RESAMPLES = 200


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- the phantoms' own truth ---------------------------------------------------------------

def test_phantoms_write_their_metadata_and_boxes(tmp_path):
    root = write_phantoms(tmp_path / "p", per_class=10, size=64, seed=3)
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*")
                    if p.suffix in (".jpg", ".png"))
    meta = {r["file"]: r for r in _rows(root / METADATA)}
    assert sorted(meta) == images
    boxes = _rows(root / BOXES)
    boxed = {b["file"] for b in boxes}
    assert boxed == {f for f in images if "/fractured/" in f}  # every break, nothing else
    for f, r in meta.items():
        fractured = "/fractured/" in f
        assert (r["fracture_type"] != "none") == fractured
        assert r["fracture_type"] in ("none", "transverse", "oblique", "comminuted",
                                      "incomplete")
        assert r["bone_type"] in ("single", "paired")
        assert r["lookalike"] in ("none", "nutrient canal", "growth plate")
    for b in boxes:
        x0, y0, x1, y1 = (float(b[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert (x1 - x0) * (y1 - y0) < 0.5 * 64 * 64  # a box around the break, not the image


# --- units ----------------------------------------------------------------------------------

def test_boxes_follow_the_squash_resize_and_never_vanish():
    # a 200 x 100 (width x height) image squashed to 10 x 10: its top-left quarter
    mask = box_mask([[0, 0, 100, 50]], 200, 100, 10)
    expected = np.zeros((10, 10), bool)
    expected[:5, :5] = True
    np.testing.assert_array_equal(mask, expected)
    tiny = box_mask([[101, 51, 102, 52]], 200, 100, 10)  # smaller than a pixel
    assert tiny.sum() == 1 and tiny[5, 5]

    heat = np.zeros((3, 10, 10))
    heat[0, 2, 2] = 1.0  # peak inside the box
    heat[1, 8, 8], heat[1, 1, 1] = 1.0, 0.5  # peak outside, some mass inside
    per = score_maps(heat, np.stack([expected] * 3))  # map 2 is zero everywhere
    np.testing.assert_array_equal(per["pointing"], [1, 0, 0])
    np.testing.assert_allclose(per["mass"], [1.0, 0.5 / 1.5, 0.0])
    np.testing.assert_allclose(per["chance"], 0.25)
    np.testing.assert_array_equal(per["empty"], [False, False, True])


def test_subgroup_tables_list_missing_files_and_refuse_tables_that_match_nothing():
    rng = np.random.default_rng(0)
    files = [f"val/{c}/{i}.png" for c in ("fractured", "not_fractured") for i in range(30)]
    labels = np.array([1] * 30 + [0] * 30)
    probs = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    table = {f: {"file": f, "site": "A" if i % 2 else "B", "id": str(i)}
             for i, f in enumerate(files[:-2])}
    out = subgroups(labels, probs, files, table, "t.csv", 0.5, 50, 0, 5)
    assert out["missing"] == {"count": 2, "files": files[-2:]}
    assert set(out["columns"]) == {"site"} and "id" in out["skipped_columns"]  # 58 values
    assert sum(g["n"] for g in out["columns"]["site"].values()) == 58
    with pytest.raises(UserError, match=r"no row matches.*table: 'x/1.png'.*images: 'val/"):
        subgroups(labels, probs, files, {"x/1.png": {"file": "x/1.png", "site": "A"}},
                  "t.csv", 0.5, 50, 0, 5)
    with pytest.raises(UserError, match="no column 'age'"):
        subgroups(labels, probs, files, table, "t.csv", 0.5, 50, 0, 5, columns=("age",))
    few = subgroups(labels[25:35], probs[25:35], files[25:35], table, "t.csv", 0.5, 50, 0, 6)
    assert few["overall"]["too_small"] == {
        "roc_auc": "too small: 5 fractured (needs 6)",
        "sensitivity": "too small: 5 fractured (needs 6)",
        "specificity": "too small: 5 not fractured (needs 6)"}


def test_cv_folds_keep_groups_and_identical_images_together(phantom_root):
    pool = [e for s in ("train", "val") for e in scan_folder(phantom_root).examples[s]]
    # two "patients" per image pair, and one image's bytes claimed by another file
    pool[1] = (pool[1][0], pool[1][1], pool[7][2])
    table = Path(phantom_root).parent / "patients.csv"
    with open(table, "w") as f:
        f.write("file,patient\n" + "".join(f"{rel},p{i // 2}\n"
                                           for i, (rel, _, _) in enumerate(pool)))
    config = tiny_config(**{"data.folds": 3, "data.group_column": "patient",
                            "eval.metadata": str(table)})
    plan = plan_folds(config, str(phantom_root), pool)
    held = np.concatenate([f["test"] for f in plan])
    assert sorted(held) == list(range(len(pool)))  # every image held out exactly once
    fold_of = {int(i): k for k, f in enumerate(plan) for i in f["test"]}
    for i in range(0, len(pool) - 1, 2):
        assert fold_of[i] == fold_of[i + 1]  # one patient, one fold
    assert fold_of[1] == fold_of[7]  # the same bytes, one fold
    for f in plan:
        parts = [set(f[s].tolist()) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(set().union(*parts)) == len(pool)
        for s in ("train", "val", "test"):  # stratified: both classes everywhere
            assert {pool[i][1] for i in f[s]} == {0, 1}


def test_a_stored_cv_plan_refuses_other_settings_or_images(phantom_root, tmp_path):
    from fracture_jax.cross_validation import _stored_plan
    pool = [e for s in ("train", "val") for e in scan_folder(phantom_root).examples[s]]
    config = tiny_config(**{"data.folds": 3})
    first = _stored_plan(tmp_path, config, Path(phantom_root), pool)
    again = _stored_plan(tmp_path, config, Path(phantom_root), pool)  # a resume: the same plan
    assert all((a[s] == b[s]).all() for a, b in zip(first, again) for s in a)
    with pytest.raises(UserError, match=r"fold_val_share: 0.2, now 0.3"):
        _stored_plan(tmp_path, tiny_config(**{"data.folds": 3, "data.fold_val_share": 0.3}),
                     Path(phantom_root), pool)
    with pytest.raises(UserError, match="planned for other images"):
        _stored_plan(tmp_path, config, Path(phantom_root), pool[1:])


# --- a trained run's report ------------------------------------------------------------------

@pytest.fixture(scope="module")
def clinical_run(tmp_path_factory):
    """The small CNN trained on 96 px phantoms for 300 steps (the demo's recipe, shorter),
    then evaluated. (At this size an untrained model's Grad-CAM mass in the boxes is below
    chance: 0.027 against 0.037.)"""
    root = write_phantoms(tmp_path_factory.mktemp("phantoms"), per_class=300, size=96, seed=5)
    workdir = tmp_path_factory.mktemp("clinical")
    overrides = {
        "data.root": str(root), "data.num_workers": 0, "model.image_size": 96,
        "optimizer.name": "adam", "optimizer.lr": 2e-3, "schedule.name": "warmup_cosine",
        "schedule.warmup_epochs": 0.3, "train.batch_size": 16, "train.epochs": 8,
        "train.patience": 8, "eval.bootstrap": RESAMPLES, "eval.subgroup_min_class": 3,
        "eval.shortcut_column": "lookalike"}
    config = tiny_config(**overrides)
    # a process of its own: one device, as a user's CPU run (the tests' 8 faked ones halve
    # the speed of this small model)
    subprocess.run([sys.executable, str(REPO / "main.py"), f"--workdir={workdir}",
                    *(f"--config.{k}={v}" for k, v in overrides.items()),
                    *(f"--config.{k}={config[k.split('.')[0]][k.split('.')[1]]}" for k in (
                        "model.name", "model.dropout", "train.allow_chance"))],
                   check=True, capture_output=True, timeout=900,
                   env=os.environ | {"XLA_FLAGS": ""})
    return root, workdir, config


def _bootstrap(n, stats, seed=0):
    """The documented procedure, written out: resample r's weights are the r-th multinomial
    draw of default_rng(seed); NaN draws drop out; 2.5th and 97.5th percentiles."""
    rng = np.random.default_rng(seed)
    draws = [stats(rng.multinomial(n, np.full(n, 1.0 / n))) for _ in range(RESAMPLES)]
    out = {}
    for k in draws[0]:
        v = np.array([d[k] for d in draws], float)
        v = v[np.isfinite(v)]
        out[k] = np.percentile(v, [2.5, 97.5]).tolist() if v.size else [np.nan, np.nan]
    return out


def _group_stats(y, p, threshold):
    def stats(w):
        pred = p >= threshold
        auc = (skm.roc_auc_score(y, p, sample_weight=w) if len(set(y[w > 0])) == 2
               else np.nan)
        tp, fn = w[pred & (y == 1)].sum(), w[~pred & (y == 1)].sum()
        tn, fp = w[~pred & (y == 0)].sum(), w[pred & (y == 0)].sum()
        return {"roc_auc": auc, "sensitivity": tp / (tp + fn) if tp + fn else np.nan,
                "specificity": tn / (tn + fp) if tn + fp else np.nan}
    return stats


def _check_group(scored, y, p, threshold, min_class, overall=None):
    assert scored["n"] == len(y) and scored["positives"] == int(y.sum())
    stats = _group_stats(y, p, threshold)
    point, ci = stats(np.ones(len(y))), _bootstrap(len(y), stats)
    needs = {"roc_auc": (1, 0), "sensitivity": (1,), "specificity": (0,)}
    for name, classes in needs.items():
        small = any(np.sum(y == c) < min_class for c in classes)
        assert (name in scored["too_small"]) == small, name
        if small:
            continue
        np.testing.assert_allclose(scored["metrics"][name], point[name], rtol=1e-9)
        np.testing.assert_allclose(scored["ci95"][name], ci[name], rtol=1e-9)
        if overall is not None:
            assert (name in scored["below_overall"]) == (ci[name][1] < overall[name])


def test_subgroups_and_shortcut_audit_recomputed_from_the_csvs(clinical_run):
    root, workdir, config = clinical_run
    out = workdir / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    threshold = metrics["results"][metrics["primary"]]["threshold"]["value"]
    preds = _rows(out / "predictions_test.csv")
    y = np.array([int(r["label"]) for r in preds])
    p = np.array([float(r[metrics["primary"]]) for r in preds])
    meta = {r["file"]: r for r in _rows(root / METADATA)}
    sub = metrics["subgroups"]
    assert sub["split"] == "test" and sub["missing"]["count"] == 0
    np.testing.assert_allclose(sub["threshold"], threshold)
    # the CSV keeps 6 decimals; recompute from the unrounded ones the report used
    p_exact = np.array(load_probabilities(workdir, config))
    np.testing.assert_allclose(p_exact, p, atol=1e-6)
    _check_group(sub["overall"], y, p_exact, threshold, 3)
    overall = sub["overall"]["metrics"]
    assert set(sub["columns"]) == {"bone_type", "fracture_type", "lookalike"}
    for column, groups in sub["columns"].items():
        values = np.array([meta[r["file"]][column] for r in preds])
        assert sorted(groups) == sorted(set(values))
        for value, scored in groups.items():
            m = values == value
            _check_group(scored, y[m], p_exact[m], threshold, 3, overall)
    cut = metrics["shortcut"]
    has = np.array([meta[r["file"]]["lookalike"] != "none" for r in preds])
    _check_group(cut["without"], y[~has], p_exact[~has], threshold, 3, overall)
    _check_group(cut["with"], y[has], p_exact[has], threshold, 3, overall)


def load_probabilities(workdir, config):
    """The run's test probabilities at full precision, from a fresh forward pass."""
    from fracture_jax import parallel
    from fracture_jax.data import dataset
    from fracture_jax.evaluate import member_probabilities
    member = load_member(str(workdir))
    _, sources = dataset.load_as_prepared(member.config, str(workdir), 96)
    probs, _ = member_probabilities(member, {"test": sources["test"]}, config,
                                    parallel.make_mesh())
    return probs["test"][0]


def test_localization_recomputed_and_grad_cam_beats_chance(clinical_run):
    root, workdir, config = clinical_run
    out = workdir / "eval"
    loc = json.loads((out / "metrics.json").read_text())["localization"]
    rows = _rows(out / "localization_test.csv")
    boxes = {}
    for b in _rows(root / BOXES):
        boxes.setdefault(b["file"], []).append(
            [float(b[k]) for k in ("x_min", "y_min", "x_max", "y_max")])
    fractured = [r["file"] for r in _rows(out / "predictions_test.csv") if r["label"] == "1"]
    assert [r["file"] for r in rows] == fractured and loc["n"] == len(fractured)

    member = load_member(str(workdir))
    from fracture_jax.data import dataset
    _, sources = dataset.load_as_prepared(member.config, str(workdir), 96)
    source = sources["test"]
    index = {name: i for i, name in enumerate(source.filenames)}
    # the maps as the evaluation computed them (Grad-CAM itself is tested in test_eval)
    heat = heat_maps(member.model, member.variables, source, [index[f] for f in fractured], 96)
    heat = np.asarray(heat, np.float64)
    per = {"pointing": [], "mass": [], "chance": []}
    for f, h, row in zip(fractured, heat, rows):
        width, height = Image.open(root / f).size
        assert (int(row["width"]), int(row["height"])) == (width, height)
        centre = (np.arange(96) + 0.5) / 96
        xs, ys = centre * width, centre * height
        mask = np.zeros((96, 96), bool)
        for x0, y0, x1, y1 in boxes[f]:
            mask |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        r, c = np.unravel_index(np.argmax(h), h.shape)
        per["pointing"].append(float(mask[r, c] and h.sum() > 0))
        per["mass"].append(h[mask].sum() / h.sum() if h.sum() > 0 else 0.0)
        per["chance"].append(mask.mean())
        assert (int(row["peak_row"]), int(row["peak_col"])) == (r, c)
        assert int(row["pointing"]) == per["pointing"][-1]
        np.testing.assert_allclose(float(row["mass"]), per["mass"][-1], atol=2e-6)
        np.testing.assert_allclose(float(row["chance"]), per["chance"][-1], atol=1e-6)
    values = {k: np.array(v) for k, v in per.items()}
    values["pointing_minus_chance"] = values["pointing"] - values["chance"]
    values["mass_minus_chance"] = values["mass"] - values["chance"]
    n = len(fractured)
    ci = _bootstrap(n, lambda w: {k: float(np.dot(w, v) / n) for k, v in values.items()})
    for k, v in values.items():
        np.testing.assert_allclose(loc["mean"][k], v.mean(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(loc["ci95"][k], ci[k], rtol=1e-5, atol=1e-7)
    # the trained model looks at the breaks more than a uniform map does
    assert loc["beats_chance"]["mass"] and ci["mass_minus_chance"][0] > 0
    assert (out / "localization.png").is_file()


@pytest.mark.skipif(not _chromium() and not os.environ.get("FRACTURE_JAX_REQUIRE_BROWSER"),
                    reason="no chromium here (.ci/run installs it and requires this test)")
def test_clinical_sections_render_in_headless_chromium(clinical_run, tmp_path):
    _, workdir, _ = clinical_run
    page = (workdir / "eval" / "report.html").as_uri()
    dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p'}",
                          "--dump-dom", page], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    for heading in ("<h2>Subgroups</h2>", "<h3>fracture_type</h3>",
                    "Shortcut audit: lookalike",
                    "<h2>Localization: Grad-CAM against the fracture boxes</h2>",
                    "Grad-CAM and fracture boxes (test)"):
        assert heading in dom, heading
    assert 'data-images-rendered="7/7"' in dom  # the six figures and the localization


# --- cross-validation --------------------------------------------------------------------------

def _sk_metrics(y, p, threshold, w=None, ranking_only=False, threshold_only=False):
    """The report's metrics from scikit-learn and numpy; NaN where undefined."""
    w = np.ones(len(y)) if w is None else np.asarray(w, float)
    out = {}
    if not threshold_only:
        both = len(set(y[w > 0])) == 2
        out["roc_auc"] = skm.roc_auc_score(y, p, sample_weight=w) if both else np.nan
        out["pr_auc"] = skm.average_precision_score(y, p, sample_weight=w) if both else np.nan
        out["brier"] = skm.brier_score_loss(y, p, sample_weight=w)
        bins = np.clip((p * 15).astype(int), 0, 14)  # 15 equal-width bins
        out["ece"] = sum(abs(np.sum(w[bins == b] * (y[bins == b] - p[bins == b])))
                         for b in range(15)) / w.sum()
    if not ranking_only:
        pred = p >= threshold
        tp, fp = w[pred & (y == 1)].sum(), w[pred & (y == 0)].sum()
        fn, tn = w[~pred & (y == 1)].sum(), w[~pred & (y == 0)].sum()

        def ratio(a, b):
            return a / b if b else np.nan

        out |= {"accuracy": ratio(tp + tn, w.sum()), "precision": ratio(tp, tp + fp),
                "recall": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
                "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}
    return out


def _check_scored(scored, metrics_of, n):
    """Point values and the 50-resample bootstrap intervals of one scored block."""
    point = metrics_of(np.ones(n))
    rng = np.random.default_rng(0)
    draws = [metrics_of(rng.multinomial(n, np.full(n, 1.0 / n))) for _ in range(50)]
    assert set(scored["metrics"]) == set(point)
    for name, value in point.items():
        np.testing.assert_allclose(scored["metrics"][name], value, atol=1e-5, err_msg=name)
        v = np.array([d[name] for d in draws], float)
        v = v[np.isfinite(v)]  # (none left: the interval is undefined too)
        expected = np.percentile(v, [2.5, 97.5]) if v.size else [np.nan, np.nan]
        np.testing.assert_allclose(scored["ci95"][name], expected, atol=1e-5, err_msg=name)


def _cv_command(workdir, root, table):
    overrides = {"model.name": "smallcnn", "model.image_size": 32,
                 "data.root": root, "data.num_workers": 0, "data.folds": 3,
                 "data.group_column": "patient", "eval.metadata": table,
                 "train.batch_size": 8, "train.epochs": 2, "train.checkpoint_every": 1,
                 "train.log_every": 1, "optimizer.lr": 3e-3, "eval.bootstrap": 50}
    return [sys.executable, str(REPO / "main.py"), "--config=" + str(REPO / "configs/default.py"),
            f"--workdir={workdir}", "--mode=cv"] + [f"--config.{k}={v}"
                                                    for k, v in overrides.items()]


def test_cross_validation_killed_mid_fold_resumes_and_pools_the_folds(phantom_root, tmp_path):
    table = tmp_path / "patients.csv"
    pool = sorted(p.relative_to(phantom_root).as_posix() for s in ("train", "val")
                  for p in (phantom_root / s).rglob("*.*"))
    table.write_text("file,patient\n" + "".join(f"{f},p{i // 2}\n" for i, f in enumerate(pool)))
    workdir = tmp_path / "cv"
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # killed once fold 1 has a checkpoint
        proc = subprocess.Popen(_cv_command(workdir, phantom_root, table), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        saved = workdir / "cv" / "fold_1" / "checkpoints" / "latest"
        while not list(saved.glob("[0-9]*/commit_success.txt")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        assert not _leftovers(proc.pid)
    assert (workdir / "cv" / "fold_0" / "done").is_file(), log.read_text()[-3000:]
    assert not (workdir / "cv" / "fold_1" / "done").is_file()
    fold0 = {p: p.stat().st_mtime_ns for p in (workdir / "cv" / "fold_0").rglob("*")
             if p.is_file()}
    second = subprocess.run(_cv_command(workdir, phantom_root, table), capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "fold 0 (1 of 3): done before, kept" in second.stderr
    assert "resumed from" in second.stderr  # fold 1 went on from its checkpoint
    assert {p: p.stat().st_mtime_ns for p in fold0} == fold0  # fold 0 untouched

    cv = workdir / "cv"
    metrics = json.loads((cv / "metrics.json").read_text())
    plan = json.loads((cv / "folds.json").read_text())
    assert plan["files"] == pool
    oof = _rows(cv / "oof_predictions.csv")
    assert [r["file"] for r in oof] == pool  # every pooled image, once
    y = np.array([int(r["label"]) for r in oof])
    p = np.array([float(r["probability"]) for r in oof])
    fold = np.array([int(r["fold"]) for r in oof])
    patient = np.array([i // 2 for i in range(len(pool))])
    assert all(len(set(fold[patient == q])) == 1 for q in set(patient))  # one patient, one fold
    decisions = np.zeros(len(pool), bool)
    for k in range(3):  # each fold's row: its held-out images at its own threshold
        m = fold == k
        assert sorted(np.flatnonzero(m)) == plan["plan"][k]["test"]
        fm = json.loads((cv / f"fold_{k}" / "eval" / "metrics.json").read_text())
        row = metrics["per_fold"][k]
        assert row["threshold"] == fm["results"][fm["primary"]]["threshold"]["value"]
        assert (row["n"], row["positives"]) == (m.sum(), y[m].sum())
        assert row["train"] + row["val"] + row["n"] == len(pool)
        expected = _sk_metrics(y[m], p[m], row["threshold"])
        for name in ("roc_auc", "pr_auc", "recall", "specificity", "brier", "ece"):
            np.testing.assert_allclose(row[name], expected[name], atol=1e-5, err_msg=name)
        decisions[m] = p[m] >= row["threshold"]
    for name in metrics["mean"]:
        values = [r[name] for r in metrics["per_fold"]]
        np.testing.assert_allclose(metrics["mean"][name], np.mean(values))
        np.testing.assert_allclose(metrics["std"][name], np.std(values, ddof=1))

    def pooled(w):  # ranking metrics of the probabilities, the rest of each fold's decision
        return _sk_metrics(y, p, 0.5, w, ranking_only=True) | _sk_metrics(
            y, decisions.astype(float), 0.5, w, threshold_only=True)

    _check_scored(metrics["out_of_fold"], pooled, len(y))
    test = _rows(cv / "predictions_test.csv")
    ty = np.array([int(r["label"]) for r in test])
    folds = np.array([[float(r[f"fold_{k}"]) for k in range(3)] for r in test])
    ensemble = np.array([float(r["ensemble"]) for r in test])
    np.testing.assert_allclose(ensemble, folds.mean(axis=1), atol=2e-6)
    scored = metrics["test_ensemble"]
    fpr, tpr, cut = skm.roc_curve(y, p)  # Youden's J on the pooled out-of-fold predictions
    np.testing.assert_allclose(scored["threshold"], cut[1:][np.argmax((tpr - fpr)[1:])],
                               atol=1e-6)
    _check_scored(scored, lambda w: _sk_metrics(ty, ensemble, scored["threshold"], w), len(ty))
    assert (cv / "report.html").is_file() and (cv / "roc_folds.png").is_file()
    if _chromium():
        dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'b'}",
                              "--dump-dom", (cv / "report.html").as_uri()], check=True,
                             capture_output=True, text=True, timeout=120).stdout
        assert "<h2>Per fold (held-out images)</h2>" in dom
        assert 'data-images-rendered="1/1"' in dom
