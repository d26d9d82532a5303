"""``report.html``: one self-contained page (figures embedded) with the data summary, the
config, every metric with its 95% CI, and all figures."""

import base64
import html
import json
import time

from fracture_jax.files import atomic_path

METRICS = ("roc_auc", "pr_auc", "accuracy", "recall", "specificity", "precision", "npv", "f1",
           "brier", "ece")
LABELS = {"roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)", "accuracy": "accuracy",
          "recall": "sensitivity (recall)", "specificity": "specificity",
          "precision": "precision (PPV)", "npv": "NPV", "f1": "F1", "brier": "Brier score",
          "ece": "expected calibration error"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f3f7; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
.warning { color: #900; background: #fee; border: 1px solid #c66; padding: 6px 10px; }
"""

# Counts the figures that decoded, so a broken page says so at its foot.
CHECK_IMAGES = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-rendered', ok + '/' + imgs.length);
  document.getElementById('render-check').textContent =
    ok === imgs.length ? 'All ' + ok + ' figures rendered.' : (imgs.length - ok) +
    ' of ' + imgs.length + ' figures failed to render.';
});
"""


def _e(text) -> str:
    return html.escape(str(text))


def _table(header, rows) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _with_ci(scored: dict, key: str) -> str:
    v, (lo, hi) = scored["metrics"][key], scored["ci95"][key]
    if v != v:  # NaN: the metric has no value here
        return "n/a (undefined: one class only, or no positive prediction)"
    interval = f"[{lo:.3f}, {hi:.3f}]" if lo == lo else "[n/a: undefined in every resample]"
    return f"{v:.3f} {interval}"


def metrics_table(result: dict) -> str:
    columns = [(s, t) for s in ("val", "test") if s in result for t in ("operating", "at_0.5")]
    names = {"operating": "operating", "at_0.5": "fixed"}
    header = ["metric"] + [f"{s}, {names[t]} threshold {result[s][t]['threshold']:.3f}"
                           for s, t in columns]
    rows = [[LABELS[k]] + [_with_ci(result[s][t], k) for s, t in columns] for k in METRICS]
    rows.append(["images (fractured)"] + [f"{result[s][t]['n']} ({result[s][t]['positives']})"
                                         for s, t in columns])
    return _table(header, rows)


def class_report_table(scored: dict) -> str:
    rep = scored["classification_report"]
    rows = [[name, *(f"{rep[name][k]:.3f}" for k in ("precision", "recall", "f1-score")),
             int(rep[name]["support"])]
            for name in rep if isinstance(rep[name], dict)]
    return _table(["class", "precision", "recall", "f1-score", "support"], rows)


SUBGROUP_METRICS = {"roc_auc": "ROC AUC", "sensitivity": "sensitivity",
                    "specificity": "specificity"}


def _group_cells(scored: dict) -> list[str]:
    """n (fractured), then each subgroup metric with its interval, or why it has none; a
    metric whose interval lies wholly below the overall value is marked."""
    cells = [f"{scored['n']} ({scored['positives']})"]
    for key in SUBGROUP_METRICS:
        if key in scored["too_small"]:
            cells.append(scored["too_small"][key])
            continue
        wrapped = {"metrics": scored["metrics"], "ci95": scored["ci95"]}
        flag = " \u25bc below overall" if key in scored["below_overall"] else ""
        cells.append(_with_ci(wrapped, key) + flag)
    return cells


def subgroup_section(metrics: dict) -> list[str]:
    """The subgroup tables and the shortcut audit, when the evaluation had a metadata table."""
    if "subgroups" not in metrics:
        return []
    sub = metrics["subgroups"]
    header = ["group", "images (fractured)", *SUBGROUP_METRICS.values()]
    parts = ["<h2>Subgroups</h2>",
             f"<p>{_e(sub['split'])} split, operating threshold {sub['threshold']:.3f}, table "
             f"{_e(sub['table'])}. 95% bootstrap intervals; \u25bc marks an interval wholly "
             "below the overall value. A metric needs "
             f"{sub['min_class']} images of each class it depends on.</p>",
             _table(header, [["all images", *_group_cells(sub["overall"])]])]
    for column, groups in sub["columns"].items():
        parts += [f"<h3>{_e(column)}</h3>",
                  _table(header, [[value, *_group_cells(g)] for value, g in groups.items()])]
    for column, why in sub["skipped_columns"].items():
        parts.append(f'<p class="note">column {_e(column)} left out: {_e(why)}</p>')
    missing = sub["missing"]
    if missing["count"]:
        listed = ", ".join(missing["files"][:20]) + (" ..." if missing["count"] > 20 else "")
        parts.append(f'<p class="warning">{missing["count"]} evaluated images are not in the '
                     f"table and are in no subgroup: {_e(listed)}</p>")
    if "shortcut" in metrics:
        cut = metrics["shortcut"]
        parts += [f"<h3>Shortcut audit: {_e(cut['column'])}</h3>",
                  f"<p>The metrics on the images without {_e(cut['column'])}, beside all "
                  "images: a model that learned the shortcut drops here.</p>",
                  _table(header, [[f"{name} {cut['column']}" if name != "all" else
                                   "all images", *_group_cells(cut[name])]
                                  for name in ("all", "without", "with")])]
    return parts


def localization_section(metrics: dict) -> list[str]:
    """The Grad-CAM localization table, when the evaluation had a box table."""
    if "localization" not in metrics:
        return []
    loc = metrics["localization"]
    parts = ["<h2>Localization: Grad-CAM against the fracture boxes</h2>",
             f"<p>{loc['n']} fractured {_e(loc['split'])} images with boxes (of "
             f"{loc['fractured']}), Grad-CAM of {_e(loc['model'])}, table {_e(loc['table'])}. "
             "Pointing game: the map's peak inside a box. Mass: the map's share inside the "
             "boxes. Chance: a uniform map, whose score on both is the boxes' share of the "
             "image.</p>"]
    if loc["n"]:
        mean, ci = loc["mean"], loc["ci95"]

        def cell(key):
            return f"{mean[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]"

        beats = {k: "yes" if v else "no" for k, v in loc["beats_chance"].items()}
        parts.append(_table(["measure", "Grad-CAM", "chance (uniform map)",
                             "difference", "beats chance"],
                            [["pointing game", cell("pointing"), cell("chance"),
                              cell("pointing_minus_chance"), beats["pointing"]],
                             ["mass in boxes", cell("mass"), cell("chance"),
                              cell("mass_minus_chance"), beats["mass"]]]))
        if loc["empty_maps"]:
            parts.append(f'<p class="note">{loc["empty_maps"]} maps are zero everywhere '
                         "(counted as misses).</p>")
    if loc["without_boxes"]["count"]:
        parts.append(f'<p class="note">{loc["without_boxes"]["count"]} fractured images have '
                     "no box and are left out.</p>")
    return parts


def _figure(title: str, path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<figure><figcaption><b>{_e(title)}</b></figcaption>'
            f'<img alt="{_e(title)}" src="data:image/png;base64,{data}"></figure>')


def _page(path: str, title: str, parts: list[str]) -> str:
    """The self-contained page: style, the figure check, ``parts``; written atomically."""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style><script>{CHECK_IMAGES}</script></head><body>"
            + "\n".join(parts)
            + '<p id="render-check" class="note">Figures not checked (scripts off).</p>'
            "</body></html>")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(page)
    return path


def write_cv_report(path: str, cv: dict, figures: dict) -> str:
    """The cross-validation page: per-fold table, mean and SD, pooled out-of-fold metrics, the
    test split scored by the fold ensemble, the ROC curves."""
    cv_metrics = list(cv["mean"])  # the per-fold metrics, in their order
    rows = [[f"fold {f['fold']}", f"{f['train']} / {f['val']} / {f['n']} ({f['positives']})",
             f"{f['threshold']:.3f}", *(f"{f[k]:.3f}" for k in cv_metrics)]
            for f in cv["per_fold"]]
    rows.append(["mean \u00b1 SD", "", "", *(f"{cv['mean'][k]:.3f} \u00b1 {cv['std'][k]:.3f}"
                                             for k in cv_metrics)])
    oof = cv["out_of_fold"]
    parts = [f"<h1>Cross-validation: {cv['folds']} folds</h1>",
             "<p>Train and val pooled and split into stratified folds"
             + (f", grouped by <b>{_e(cv['group_column'])}</b>" if cv["group_column"] else "")
             + " (identical images always in one fold). Each fold's held-out images are "
             "scored only; early stopping and the fold's operating threshold used a val share "
             f"({cv['fold_val_share']:g}) of its other folds.</p>",
             "<h2>Per fold (held-out images)</h2>",
             _table(["fold", "train / val / held out (fractured)", "threshold",
                     *(LABELS[k] for k in cv_metrics)], rows),
             "<h2>Pooled out-of-fold (95% CI)</h2>",
             f"<p>{oof['n']} images ({oof['positives']} fractured), each predicted by the one "
             "model that did not train on it; thresholded metrics use each fold's threshold."
             "</p>",
             _table(["metric", "pooled out-of-fold"],
                    [[LABELS[k], _with_ci(oof, k)] for k in METRICS])]
    if "test_ensemble" in cv:
        t = cv["test_ensemble"]
        parts += ["<h2>Test split, fold ensemble (95% CI)</h2>",
                  f"<p>Mean probability of the {cv['folds']} fold models, threshold "
                  f"{t['threshold']:.3f} chosen on the pooled out-of-fold predictions "
                  f"({_e(t['method'])}); {t['n']} images ({t['positives']} fractured).</p>",
                  _table(["metric", "test"], [[LABELS[k], _with_ci(t, k)] for k in METRICS])]
    parts += ["<h2>Figures</h2>", *(_figure(t, p) for t, p in figures.items())]
    return _page(path, f"cross-validation, {cv['folds']} folds", parts)


def write_report(path: str, metrics: dict, figures: dict, data_report, config: dict) -> str:
    """Write the page atomically and return its path."""
    primary = metrics["primary"]
    result = metrics["results"][primary]
    thr = result["threshold"]
    split = "test" if "test" in result else "val"
    parts = [f"<h1>Fracture classification report: {_e(primary)}</h1>",
             *(f'<p class="warning"><b>Warning:</b> {_e(w)}</p>'
               for w in metrics.get("warnings", [])),
             f'<p class="note">fracture_jax {_e(metrics["fracture_jax"])}, '
             f'{time.strftime("%Y-%m-%d %H:%M")}; test-time flip: {metrics["flip_tta"]}; '
             f'95% CIs from {metrics["bootstrap"]["resamples"]} bootstrap resamples of the '
             f'images (seed {metrics["bootstrap"]["seed"]}).</p>',
             "<h2>Data</h2>",
             *([f"<p>{_e(metrics['data']['root'])}"
                + ("" if metrics["data"]["run_data"] else ": <b>another data folder than the "
                   "run's</b>, scored at the run's threshold") + "</p>"]
               if "data" in metrics else []),
             _table(["split", "fractured", "not fractured"],
                    [[s, c["fractured"], c["not_fractured"]]
                     for s, c in data_report.counts().items()]),
             f"<p>{len(data_report.skipped)} files skipped, {len(data_report.duplicates)} "
             f"groups of duplicate files, {len(data_report.leakage)} across splits.</p>",
             "<h2>Operating threshold</h2>",
             f"<p>{thr['value']:.4f}, chosen on the <b>{_e(thr['chosen_on'])}</b> split by "
             f"{_e(thr['method'])}{' (target sensitivity ' + str(thr['target_sensitivity']) + ')' if 'target_sensitivity' in thr else ''}"
             ", then applied unchanged to test.</p>",
             "<h2>Metrics (95% CI)</h2>", metrics_table(result),
             f"<h3>Classification report ({split}, operating threshold)</h3>",
             class_report_table(result[split]["operating"])]
    if len(metrics["members"]) > 1:
        rows = [[name, f"{r['threshold']['value']:.3f}",
                 *(_with_ci(r[split]["operating"], k) for k in ("roc_auc", "recall",
                                                                "specificity"))]
                for name, r in metrics["results"].items()]
        parts += ["<h2>Ensemble members</h2>",
                  _table(["model", "threshold", f"{split} ROC AUC", "sensitivity",
                          "specificity"], rows)]
    parts += subgroup_section(metrics) + localization_section(metrics)
    speed = [[name, s, v["images"], v["images_per_s"]] for name, sp in metrics["speed"].items()
             for s, v in sp.items()]
    parts += ["<h2>Speed</h2>", _table(["model", "split", "images", "images/s"], speed),
              "<h2>Figures</h2>", *(_figure(t, p) for t, p in figures.items()),
              "<h2>Config</h2>", f"<pre>{_e(json.dumps(config, indent=1))}</pre>"]
    return _page(path, primary, parts)
