"""``--mode=eval``: score the best checkpoint of a run (or an ensemble of runs) on val and test.

The operating threshold is chosen on val only and then applied to test. Everything goes to
``<workdir>/eval/``: ``metrics.json`` (metrics with bootstrap 95% CIs at the operating
threshold and at 0.5), ``threshold.json`` (what ``--mode=predict`` uses), the figures and
``report.html``.
"""

import dataclasses
import json
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import logging

import fracture_jax
from fracture_jax import clinical, parallel, plots
from fracture_jax.checkpoint import load_best
from fracture_jax.data import dataset
from fracture_jax.data.pipeline import example_at, file_names
from fracture_jax.errors import UserError
from fracture_jax.files import write_csv, write_json
from fracture_jax.inference import make_forward, predict
from fracture_jax.models import builder
from fracture_jax.report import write_report
from fracture_jax.scoring import choose_threshold, score_split


@dataclasses.dataclass
class Member:
    """One trained run: its stored config and history, model and best weights."""

    workdir: str
    config: ml_collections.ConfigDict
    meta: dict
    model: object
    variables: dict

    def history(self) -> list:
        """Every epoch the run trained, the ones after its best included (``history.json``);
        the best checkpoint's own record stops at the best epoch."""
        path = os.path.join(self.workdir, "history.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return self.meta.get("history", [])

    @property
    def name(self) -> str:
        return f"{self.config.model.name} ({os.path.basename(os.path.normpath(self.workdir))})"


def load_member(workdir: str) -> Member:
    weights, meta = load_best(workdir)
    config = ml_collections.ConfigDict(meta["config"])
    model = builder.classifier(config, imagenet_rescaling=meta.get("imagenet_rescaling", False))
    variables = {"params": weights["params"], "batch_stats": weights["batch_stats"]}
    return Member(workdir, config, meta, model, variables)


def threshold_path(workdir: str) -> str:
    return os.path.join(workdir, "eval", "threshold.json")


def read_threshold(workdir: str) -> dict:
    """The operating threshold ``--mode=eval`` chose on val for the run in ``workdir``."""
    path = threshold_path(workdir)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run --mode=eval --workdir={workdir} first, which "
                        "chooses the operating threshold on val")
    with open(path) as f:
        return json.load(f)


def sigmoid(logits) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def member_probabilities(member: Member, sources: dict, config, mesh) -> tuple[dict, dict]:
    """({split: (probs, labels)}, speed) for one member: a data-parallel pass per split."""
    forward = make_forward(member.model, mesh, member.config.model.image_size,
                           flip=config.eval.flip_tta)
    variables = parallel.replicate(member.variables, mesh)
    out, speed = {}, {}
    for split, source in sources.items():
        start = time.perf_counter()
        logits, labels = predict(forward, variables, source, config.eval.batch_size, mesh,
                                 config.data.num_workers, config.data.prefetch)
        seconds = time.perf_counter() - start
        out[split] = (sigmoid(logits), labels)
        speed[split] = {"images": len(labels), "seconds": round(seconds, 3),
                        "images_per_s": round(len(labels) / seconds, 2)}
    return out, speed


def score(probs: dict, config, stored: dict | None = None) -> dict:
    """Every split scored at the operating threshold and at 0.5, with CIs. The threshold is
    chosen on val, or is the ``stored`` one (a run's, chosen on its own val)."""
    e = config.eval
    if stored is not None:
        threshold = float(stored["value"])
        result = {"threshold": {k: v for k, v in stored.items() if k != "model"}
                  | {"chosen_on": "run's val"}}
    else:
        threshold = choose_threshold(probs["val"][1], probs["val"][0], e.threshold,
                                     e.target_sensitivity)
        result = {"threshold": {"value": threshold, "method": e.threshold, "chosen_on": "val"}
                  | ({"target_sensitivity": e.target_sensitivity}
                     if e.threshold == "sensitivity" else {})}
    for split, (p, y) in probs.items():
        result[split] = {"operating": score_split(y, p, threshold, e.bootstrap, config.seed),
                         "at_0.5": score_split(y, p, 0.5, e.bootstrap, config.seed)}
    return result


def sample_indices(labels, count: int, seed: int) -> np.ndarray:
    """Up to ``count`` examples, half of each class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:count // 2] for c in (1, 0)]
    return np.concatenate(picks)


def gradcam_cases(labels, probs, threshold: float, per_group: int) -> list[tuple[str, int]]:
    """The most confident true positives, false positives and false negatives."""
    pred = probs >= threshold
    cases = []
    for group, mask, order in (("true positive", pred & (labels == 1), -1),
                               ("false positive", pred & (labels == 0), -1),
                               ("false negative", ~pred & (labels == 1), 1)):
        idx = np.flatnonzero(mask)
        cases += [(group, int(i)) for i in idx[np.argsort(order * probs[idx])][:per_group]]
    return cases


def figures(out_dir: str, member: Member, source, probs, labels, split: str, result: dict,
            config) -> dict:
    """All PNG figures of the report: {title: path}."""
    threshold = result["threshold"]["value"]
    op = result[split]["operating"]
    size = member.config.model.image_size
    made = {}
    history = member.history()
    if history:
        made["Training history"] = plots.history_plot(history,
                                                      os.path.join(out_dir, "history.png"))
    made[f"Confusion matrix ({split}, threshold {threshold:.3f})"] = plots.confusion_plot(
        op["confusion_matrix"], os.path.join(out_dir, "confusion.png"),
        f"{split}, threshold {threshold:.3f}")
    made[f"ROC and precision-recall ({split})"] = plots.roc_pr_plot(
        labels, probs, threshold, os.path.join(out_dir, "roc_pr.png"), split)
    made[f"Reliability diagram ({split})"] = plots.reliability_plot(
        labels, probs, op["metrics"]["ece"], os.path.join(out_dir, "reliability.png"), split)

    picks = sample_indices(labels, config.eval.samples, config.seed)
    shown = [example_at(source, int(i)) for i in picks]
    right = [(probs[i] >= threshold) == (labels[i] == 1) for i in picks]
    made[f"Sample predictions ({split})"] = plots.image_grid(
        [s[0] for s in shown],
        [f"{os.path.basename(s[2])[:28]}\ntrue: {'fractured' if s[1] else 'not fractured'}, "
         f"p={probs[i]:.2f}" for s, i in zip(shown, picks)],
        os.path.join(out_dir, "samples.png"), colors=["green" if r else "red" for r in right])

    cases = gradcam_cases(labels, probs, threshold, config.eval.gradcam_per_group)
    if cases:
        picks = [i for _, i in cases]
        made[f"Grad-CAM ({split})"] = plots.image_grid(
            clinical.model_images(source, picks, size),
            [f"{g}, p={probs[i]:.2f}" for g, i in cases],
            os.path.join(out_dir, "gradcam.png"),
            heat=clinical.heat_maps(member.model, member.variables, source, picks, size))
    return made


@dataclasses.dataclass
class EvaluationData:
    """What an evaluation scores and where its report goes."""

    root: str  # the image folder
    prepared: str  # its TFDS copy
    report: object  # the copy's scan report
    sources: dict  # {"val"/"test": decoded source}, the splits present
    out_dir: str
    threshold: dict | None  # the run's stored threshold (another folder's data), else None


def _evaluation_data(config, workdir: str, members: list) -> EvaluationData:
    """The run's own data, read as it was prepared, into ``<workdir>/eval``; or the folder
    ``config.data`` names when it is another one: its own copy keyed by its content (any of
    val/ and test/ suffice), scored at the run's stored threshold, into
    ``<workdir>/eval_<folder name>``. ``eval.output_dir`` overrides either place."""
    run = members[0].config
    side = dataset.decoded_side(run)
    own = dataset.root_path(run, workdir)
    named = dataset.root_path(config, workdir) if config.data.root or config.data.synthetic else own
    if os.path.realpath(os.path.expanduser(named)) == os.path.realpath(os.path.expanduser(own)):
        found = dataset.load_as_prepared(run, workdir, side) or dataset.load(run, workdir, side)
        prepared, threshold, out_dir = dataset.prepared_dir(run, workdir), None, "eval"
    else:
        if len(members) > 1:
            raise UserError("eval.ensemble on another data folder than the run's is not "
                            "supported: evaluate each run on it")
        threshold = read_threshold(workdir)
        prepared = dataset.keyed_prepared_dir(config, named)
        found = dataset.load(config, workdir, side, prepared, required=())
        out_dir = f"eval_{os.path.basename(os.path.normpath(os.path.expanduser(named)))}"
    sources = {s: found[1][s] for s in ("val", "test") if s in found[1]}
    if not sources:
        raise UserError(f"{named} has neither a val/ nor a test/ split: nothing to score")
    out_dir = config.eval.output_dir or os.path.join(workdir, out_dir)
    if jax.process_index() == 0:
        _writable(out_dir)
    return EvaluationData(named, str(prepared), found[0], sources, out_dir, threshold)


def _writable(folder: str):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write the report to {folder} ({e.strerror}); set "
                        "--config.eval.output_dir to a writable folder") from None


def evaluate(config, workdir: str) -> dict:
    """Score ``workdir`` (and ``config.eval.ensemble``'s workdirs) and write the report.

    The data is the run's own, unless ``config.data`` names another folder
    (``_evaluation_data``).
    """
    mesh = parallel.make_mesh()
    extra = [w.strip() for w in config.eval.ensemble.split(",") if w.strip()]
    members = [load_member(w) for w in [workdir] + extra]
    data = _evaluation_data(config, workdir, members)
    clinical.check_tables(config, data.root)
    sources = data.sources

    member_probs, results, speed = [], {}, {}
    for member in members:
        probs, speed[member.name] = member_probabilities(member, sources, config, mesh)
        member_probs.append(probs)
        results[member.name] = score(probs, config, data.threshold)
        logging.info("%s: test-time flip %s, %s", member.name, config.eval.flip_tta,
                     ", ".join(f"{s} {v['images_per_s']} img/s"
                               for s, v in speed[member.name].items()))
    primary = members[0].name
    probs = member_probs[0]
    if len(members) > 1:
        primary = "ensemble (mean probability)"
        probs = {s: (np.mean([p[s][0] for p in member_probs], axis=0), member_probs[0][s][1])
                 for s in sources}
        results[primary] = score(probs, config, data.threshold)

    metrics = {"primary": primary, "members": [m.name for m in members],
               "flip_tta": config.eval.flip_tta,
               "bootstrap": {"resamples": config.eval.bootstrap, "seed": config.seed,
                             "level": 0.95},
               "speed": speed, "results": results, "fracture_jax": fracture_jax.__version__,
               "data": {"root": data.root, "run_data": data.threshold is None,
                        "prepared": data.prepared},
               "warnings": failure_flags(probs, results[primary])}
    for line in metrics["warnings"]:
        logging.warning("%s\nWARNING: %s\n%s", "!" * 70, line, "!" * 70)
    _log_summary(metrics)
    if jax.process_index() == 0:  # every process scored; the first one writes
        _publish(workdir, data, members, member_probs, probs, metrics, config)
    return metrics


def _publish(workdir: str, data: "EvaluationData", members: list, member_probs: list,
             probs: dict, metrics: dict, config):
    """The predictions, figures, metrics, threshold and report of an evaluation, on disk. On
    another data folder than the run's, the run's threshold and report stay as they were."""
    out_dir, primary, results = data.out_dir, metrics["primary"], metrics["results"]
    sources = data.sources
    for split, source in sources.items():
        columns = {m.name: p[split][0] for m, p in zip(members, member_probs)}
        if len(members) > 1:
            columns[primary] = probs[split][0]
        _write_predictions(os.path.join(out_dir, f"predictions_{split}.csv"),
                           file_names(source), probs[split][1], columns)
    split = "test" if "test" in probs else "val"
    made = figures(out_dir, members[0], sources[split], probs[split][0], probs[split][1], split,
                   results[primary], config)
    labels, p = probs[split][1], probs[split][0]
    threshold = results[primary]["threshold"]["value"]
    metrics |= clinical.subgroup_sections(config, data.root, split, file_names(sources[split]),
                                          labels, p, threshold)
    section, shown = clinical.localization_section(config, data.root, data.prepared, members[0],
                                                   split, sources[split], labels, p, out_dir)
    metrics |= section
    made |= shown
    clinical.log_findings(metrics)
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    if data.threshold is None:  # chosen now, on the run's own val
        chosen = results[members[0].name]["threshold"] | {"model": members[0].name}
        write_json(os.path.join(out_dir, "threshold.json"), chosen)
        if os.path.realpath(os.path.dirname(threshold_path(workdir))) != os.path.realpath(out_dir):
            try:
                write_json(threshold_path(workdir), chosen)
            except OSError as e:
                logging.warning("the threshold is in %s only, not in the run's %s (%s): predict "
                                "and export read it from the run", out_dir, threshold_path(workdir),
                                e.strerror)
    page = write_report(os.path.join(out_dir, "report.html"), metrics, made, data.report,
                        members[0].config.to_dict())
    print(f"evaluation done: report {page}, metrics {os.path.join(out_dir, 'metrics.json')}")


CHANCE = "contains 0.5 (chance level)"


def failure_flags(probs: dict, result: dict) -> list[str]:
    """What says the model does not work: the same probability for every image of a split, or
    a val (else test) ROC AUC whose 95% interval contains 0.5."""
    flags = []
    for split, (p, _) in probs.items():
        if np.ptp(p) < 1e-6:
            flags.append(f"{split}: the model gives every image the same probability "
                         f"({float(p[0]):.4f}); it separates nothing")
    split = "val" if "val" in result else "test"
    op = result[split]["operating"]
    auc, (low, high) = op["metrics"]["roc_auc"], op["ci95"]["roc_auc"]
    if low <= 0.5 <= high:
        flags.append(f"{split} ROC AUC {auc:.3f}, 95% interval [{low:.3f}, {high:.3f}] {CHANCE}")
    return flags


def _write_predictions(path: str, files: list[str], labels, columns: dict):
    """One row per image: file, true label, then each model's probability of fractured."""
    write_csv(path, ["file", "label", *columns],
              ([name, int(labels[i]), *(f"{p[i]:.6f}" for p in columns.values())]
               for i, name in enumerate(files)))


def _log_summary(metrics: dict):
    result = metrics["results"][metrics["primary"]]
    for split in ("val", "test"):
        if split not in result:
            continue
        op = result[split]["operating"]
        m, ci = op["metrics"], op["ci95"]
        logging.info("%s %s at threshold %.3f: %s", metrics["primary"], split, op["threshold"],
                     ", ".join(f"{k} {m[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
                               for k in ("roc_auc", "recall", "specificity", "ece")))
