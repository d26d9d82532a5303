"""Evaluation and prediction: exactly-once passes, test-time flip, Grad-CAM, the eval and
predict modes end to end, the ensemble, and the HTML report rendered in headless Chromium."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from conftest import REPO

from configs import default
from fracture_jax import cli, parallel
from fracture_jax.data.builder import data_sources, dataset_dir, prepare
from fracture_jax.data.decoded import prepare_decoded
from fracture_jax.data.pipeline import example_at
from fracture_jax.data.synthetic import write_phantoms
from fracture_jax.errors import UserError
from fracture_jax.evaluate import evaluate, failure_flags, score
from fracture_jax.gradcam import grad_cam
from fracture_jax.inference import make_forward, predict
from fracture_jax.models import FractureClassifier
from test_train import NO_AUGMENTATION, start_phase, tiny_config

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def sources(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(str(phantom_root), str(out))
    return prepare_decoded(dataset_dir(out), data_sources(str(out)), 32)


@pytest.mark.parametrize("devices,batch", [(1, 1), (3, 5), (8, 4), (8, 16)])
def test_eval_pass_sees_every_example_once_in_order(sources, devices, batch):
    """Each image's mean pixel comes back once, in the source's order, whatever the device
    count and batch size (the batch is rounded up to the device count and padding masked)."""
    mesh = parallel.make_mesh(jax.devices()[:devices])
    mean_pixel = jax.jit(jax.shard_map(lambda v, x: x.mean(axis=(1, 2, 3)), mesh=mesh,
                                       in_specs=(P(), P(parallel.AXIS)),
                                       out_specs=P(parallel.AXIS)))
    source = sources["val"]
    out, labels = predict(mean_pixel, {}, source, batch, mesh)
    expected = [example_at(source, i) for i in range(len(source))]
    np.testing.assert_allclose(out, [e[0].mean() for e in expected], rtol=1e-5)
    assert labels.tolist() == [e[1] for e in expected]


def test_flip_tta_is_the_mean_probability_of_image_and_mirror():
    model = FractureClassifier(model="smallcnn", dropout_rate=0.0)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    mesh = parallel.make_mesh()
    flipped = make_forward(model, mesh, 32, flip=True)(variables, x)
    a, b = model.apply(variables, x), model.apply(variables, x[:, :, ::-1])
    expected = jax.scipy.special.logit((jax.nn.sigmoid(a) + jax.nn.sigmoid(b)) / 2)
    np.testing.assert_allclose(flipped, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a, b)  # the mirror really is a different input


def _blob_images(n, rng, size=64, side=12):
    """Noise images; positives carry one bright square at a random place (the only signal)."""
    x = rng.uniform(40, 120, (n, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, size - side, 2)
        x[i, r:r + side, c:c + side] += 110
    return x, y


def test_grad_cam_highlights_the_region_that_carries_the_signal():
    config = tiny_config(**NO_AUGMENTATION, **{"model.image_size": 64, "optimizer.name": "adam",
                                               "optimizer.lr": 3e-3, "train.batch_size": 32})
    mesh = parallel.make_mesh(jax.devices()[:1])
    variables, program, state = start_phase(config, mesh)
    rng = np.random.default_rng(0)
    for _ in range(150):
        x, y = _blob_images(32, rng)
        state, loss, _ = program.train_step(state, parallel.shard_batch(
            {"image": x, "label": y}, mesh), jax.random.key(1))
    assert float(loss) < 0.3, "the model did not learn the blob task"
    state = jax.device_get(state)

    x = rng.uniform(40, 120, (4, 64, 64, 3)).astype(np.float32)
    corners = [(4, 4), (4, 46), (46, 4), (46, 46)]  # a square in each corner in turn
    for i, (r, c) in enumerate(corners):
        x[i, r:r + 14, c:c + 14] += 110
    model = FractureClassifier(model="smallcnn", dropout_rate=0.0)
    heat, logits = grad_cam(model, state.variables, jnp.asarray(x))
    heat = np.asarray(heat)
    assert heat.shape == (4, 64, 64) and heat.min() >= 0 and heat.max() <= 1
    assert np.all(np.asarray(logits) > 0)
    for h, (r, c) in zip(heat, corners):
        region = np.zeros_like(h, bool)
        region[max(0, r - 8):r + 22, max(0, c - 8):c + 22] = True
        assert region[np.unravel_index(h.argmax(), h.shape)]
        assert h[region].mean() > 3 * h[~region].mean()


@pytest.fixture(scope="module")
def trained_runs(phantom_root, tmp_path_factory):
    """Two tiny runs trained by --mode=train (which ends with the eval report)."""
    runs = []
    for seed in (0, 1):
        workdir = tmp_path_factory.mktemp(f"run{seed}")
        config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                                "train.epochs": 2, "eval.bootstrap": 50, "seed": seed})
        cli.run(config, str(workdir), "train")
        runs.append((config, workdir))
    return runs


def test_train_ends_with_an_eval_report(trained_runs):
    _, workdir = trained_runs[0]
    out = workdir / "eval"
    for name in ("metrics.json", "threshold.json", "report.html", "predictions_val.csv",
                 "predictions_test.csv", "history.png", "confusion.png", "roc_pr.png",
                 "reliability.png", "samples.png", "gradcam.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["results"][metrics["primary"]]
    assert result["threshold"]["chosen_on"] == "val"
    for split, n in (("val", 6), ("test", 6)):
        for at in ("operating", "at_0.5"):
            scored = result[split][at]
            assert scored["n"] == n and scored["positives"] == n // 2
            assert set(scored["metrics"]) == set(scored["ci95"]) >= {
                "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                "brier", "ece"}
            assert sum(map(sum, scored["confusion_matrix"])) == n
    rows = list(csv.DictReader(open(out / "predictions_test.csv")))
    assert len(rows) == 6 and sorted(int(r["label"]) for r in rows) == [0, 0, 0, 1, 1, 1]
    assert metrics["speed"][metrics["primary"]]["test"]["images_per_s"] > 0


def test_failure_flags():
    """A split of one probability, and a val ROC AUC interval that contains 0.5, are flagged;
    a working model is not."""
    y = np.array([0, 0, 0, 1, 1, 1])
    good = score({"val": (np.array([.1, .2, .3, .7, .8, .9]), y)}, default.get_config())
    assert failure_flags({"val": (np.array([.1, .2, .3, .7, .8, .9]), y)}, good) == []
    flat = {"val": (np.full(6, 0.37), y)}
    flags = failure_flags(flat, score(flat, default.get_config()))
    assert "val: the model gives every image the same probability (0.3700)" in flags[0]
    assert "contains 0.5 (chance level)" in flags[1]


def test_a_model_at_chance_fails_the_train_command_unless_allowed(phantom_root, tmp_path):
    """Learning rate 0: the random model's val ROC AUC interval contains 0.5. The report and
    metrics.json say so first; --mode=train then fails, unless train.allow_chance."""
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 1, "eval.bootstrap": 50, "optimizer.lr": 0.0,
                            "train.allow_chance": False})
    with pytest.raises(UserError, match="the trained model is at chance level: val ROC AUC"):
        cli.run(config, str(tmp_path), "train")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert any("chance level" in w for w in metrics["warnings"])
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.index('class="warning"') < page.index("<h2>Data</h2>")


def test_ensemble_averages_member_probabilities(trained_runs):
    (_, first), (_, second) = trained_runs
    config = default.get_config()  # no data named: the run's own data is scored
    config.data.num_workers = 0  # (grain's worker processes are tested in test_data)
    config.eval.bootstrap = 50
    config.eval.ensemble = str(second)
    config.eval.flip_tta = True
    cli.run(config, str(first), "eval")
    metrics = json.loads((first / "eval" / "metrics.json").read_text())
    assert metrics["primary"] == "ensemble (mean probability)" and len(metrics["members"]) == 2
    assert set(metrics["results"]) == set(metrics["members"]) | {metrics["primary"]}
    rows = list(csv.DictReader(open(first / "eval" / "predictions_val.csv")))
    for r in rows:
        members = [float(r[m]) for m in metrics["members"]]
        assert float(r[metrics["primary"]]) == pytest.approx(np.mean(members), abs=2e-6)


def test_predict_writes_a_row_per_file_and_reports_bad_ones(trained_runs, phantom_root,
                                                             tmp_path):
    config, workdir = trained_runs[1]
    folder = tmp_path / "incoming"
    shutil.copytree(phantom_root / "test" / "fractured", folder / "a")
    (folder / "b").mkdir()
    (folder / "b" / "notes.jpg").write_text("not an image")
    Image.new("RGBA", (50, 40), (200, 10, 10, 128)).save(folder / "b" / "rgba.png")
    config = config.copy_and_resolve_references()
    config.predict.gradcam = True
    config.predict.output = str(tmp_path / "out.csv")
    cli.run(config, str(workdir), "predict", images=str(folder))
    rows = {os.path.basename(r["file"]): r for r in csv.DictReader(open(tmp_path / "out.csv"))}
    assert len(rows) == 3 + 2
    assert "notes.jpg" in rows["notes.jpg"]["error"] and rows["notes.jpg"]["probability"] == ""
    threshold = json.loads((workdir / "eval" / "threshold.json").read_text())["value"]
    for name, r in rows.items():
        if name == "notes.jpg":
            continue
        p = float(r["probability"])
        assert 0 <= p <= 1 and r["error"] == ""
        assert r["label"] == ("fractured" if p >= threshold else "not_fractured")
    assert len(list((tmp_path / "out_gradcam").glob("*.png"))) == 4
    # a glob works too, and names no file it cannot find
    cli.run(config, str(workdir), "predict", images=str(folder / "a" / "*.jpg"))


def test_eval_without_a_trained_run_says_what_to_do(phantom_root, tmp_path):
    config = tiny_config(**{"data.root": str(phantom_root)})
    with pytest.raises(UserError, match="train first with --mode=train"):
        cli.run(config, str(tmp_path / "empty"), "eval")


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium() and not os.environ.get("FRACTURE_JAX_REQUIRE_BROWSER"),
                    reason="no chromium here (.ci/run installs it and requires this test)")
def test_report_renders_in_headless_chromium(trained_runs, tmp_path):
    _, workdir = trained_runs[0]
    page = (workdir / "eval" / "report.html").as_uri()
    common = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,6000", page],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run(common + ["--dump-dom", page], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert 'data-images-rendered="7/7"' in dom  # the page's own check: every figure decoded
    assert "All 7 figures rendered." in dom
    # the phantoms' metadata and boxes: the subgroup and localization sections
    assert "<h2>Subgroups</h2>" in dom and "<h3>bone_type</h3>" in dom
    assert "<h2>Localization: Grad-CAM against the fracture boxes</h2>" in dom
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (6000, 1200, 3)
    # tables and figures, not a blank page: many colours, and the plots' blue lines
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500
    blue = (img[..., 2] > 150) & (img[..., 0] < 80)
    assert blue.sum() > 1000


def _files(folder: Path) -> dict:
    """{relative path: bytes} of every file below ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_on_another_folder_leaves_the_run_as_it_was(trained_runs, tmp_path, monkeypatch):
    """A second data folder with a test split only: its own copy keyed by its content (in the
    user's cache, not the run's tfds/), the run's stored threshold, the report in
    eval_<folder>; the run's tfds/ and eval/ byte for byte as they were."""
    _, workdir = trained_runs[0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    other = write_phantoms(tmp_path / "hospital_b", per_class=12, size=64, seed=7)
    for split in ("train", "val"):
        shutil.rmtree(other / split)
    before = {d: _files(workdir / d) for d in ("tfds", "eval")}
    config = default.get_config()
    config.data.root, config.data.num_workers, config.eval.bootstrap = str(other), 0, 50
    metrics = evaluate(config, str(workdir))
    assert {d: _files(workdir / d) for d in ("tfds", "eval")} == before
    stored = json.loads((workdir / "eval" / "threshold.json").read_text())
    result = metrics["results"][metrics["primary"]]
    assert result["threshold"]["value"] == stored["value"]
    assert result["threshold"]["chosen_on"] == "run's val" and set(result) == {"threshold", "test"}
    out = workdir / "eval_hospital_b"
    assert json.loads((out / "metrics.json").read_text())["data"]["run_data"] is False
    assert "another data folder than the run's" in (out / "report.html").read_text()
    assert len(list(csv.DictReader(open(out / "predictions_test.csv")))) == 6
    copies = list((tmp_path / "cache" / "fracture_jax" / "prepared").iterdir())
    assert [c.name.split("-")[0] for c in copies] == ["hospital_b"]
    assert not (out / "threshold.json").exists()


def test_a_copied_workdir_is_evaluated_as_it_is(trained_runs, tmp_path, monkeypatch):
    """The run's own data is read from its prepared copy, as it was prepared: no scan of the
    data folder, nothing rebuilt, in a copy of the workdir elsewhere."""
    _, workdir = trained_runs[1]
    copied = tmp_path / "copied"
    shutil.copytree(workdir, copied)
    tfds_before = _files(copied / "tfds")

    def no_scan(*args, **kwargs):
        raise AssertionError("the data folder was scanned again")
    monkeypatch.setattr("fracture_jax.data.dataset.prepare", no_scan)
    config = default.get_config()
    config.data.num_workers, config.eval.bootstrap = 0, 50
    metrics = evaluate(config, str(copied))
    assert metrics["data"]["run_data"] is True
    assert _files(copied / "tfds") == tfds_before
    assert (copied / "eval" / "report.html").stat().st_mtime > (workdir / "eval" / "report.html").stat().st_mtime


def _read_only_eval(workdir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """--mode=eval with ``workdir`` mounted read-only in a mount namespace of its own."""
    script = (f'mount --bind "{workdir}" "{workdir}" && mount -o remount,ro,bind "{workdir}" '
              f'"{workdir}" && touch "{workdir}/probe" 2>/dev/null && exit 99; exec "$@"')
    command = [sys.executable, str(REPO / "main.py"), "--mode=eval", f"--workdir={workdir}",
               "--config.data.num_workers=0", "--config.eval.bootstrap=50", *extra]
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_a_read_only_workdir_is_evaluated_as_it_is(trained_runs, tmp_path):
    """Mounted read-only: eval says in one line where the report cannot go and how to choose
    another place; with eval.output_dir it scores the run and leaves the workdir unchanged."""
    _, workdir = trained_runs[1]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to mount a folder read-only")
    before = _files(workdir)
    result = _read_only_eval(workdir, [])
    if "mount:" in result.stderr:
        pytest.skip(f"this kernel refuses a private read-only mount: {result.stderr[:200]}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "cannot write the report to" in result.stderr and "eval.output_dir" in result.stderr
    result = _read_only_eval(workdir, [f"--config.eval.output_dir={tmp_path / 'report'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "report" / "report.html").is_file()
    assert (tmp_path / "report" / "threshold.json").is_file()
    assert _files(workdir) == before
