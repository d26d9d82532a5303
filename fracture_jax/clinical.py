"""The clinical sections of an evaluation: where the model fails (``subgroups``, from a
metadata table) and whether it looks at the fracture (``localization``, Grad-CAM against the
fracture boxes), each written to ``metrics.json``, a CSV and the report.

``eval.metadata`` and ``eval.boxes`` name the tables; ``auto`` takes ``metadata.csv`` and
``fracture_boxes.csv`` from the data folder when they are there (FracAtlas and the phantoms
ship both).
"""

import os

import jax.numpy as jnp
import numpy as np
from absl import logging

from fracture_jax import localization, plots, subgroups
from fracture_jax.augment import model_input
from fracture_jax.data.builder import data_sources
from fracture_jax.data.decode import image_size
from fracture_jax.data.pipeline import example_at, file_names
from fracture_jax.data.synthetic import BOXES, METADATA
from fracture_jax.errors import UserError
from fracture_jax.files import write_csv
from fracture_jax.gradcam import grad_cam
from fracture_jax.subgroups import table_key

GRADCAM_CHUNK = 16  # images per Grad-CAM call (one compiled shape; the last chunk is padded)


def table_path(setting: str, root: str, default_name: str) -> str | None:
    """The table a setting names: ``auto`` is ``<root>/<default_name>`` if it exists, ``""``
    is none."""
    if setting == "auto":
        path = os.path.join(os.path.expanduser(root), default_name)
        return path if os.path.isfile(path) else None
    return os.path.expanduser(setting) if setting else None


def check_tables(config, root: str):
    """Read the tables the config names, so a missing or malformed one fails before any
    model runs."""
    path = table_path(config.eval.metadata, root, METADATA)
    if path:
        subgroups.read_table(path)
    path = table_path(config.eval.boxes, root, BOXES)
    if path:
        localization.read_boxes(path)


def subgroup_sections(config, root: str, split: str, files, labels, probs, threshold: float
                      ) -> dict:
    """``{"subgroups", "shortcut"}`` of ``split`` for the metadata table the config names
    (none: {})."""
    e = config.eval
    path = table_path(e.metadata, root, METADATA)
    if path is None:
        return {}
    table = subgroups.read_table(path)
    args = (threshold, e.bootstrap, config.seed, e.subgroup_min_class)
    columns = tuple(c.strip() for c in e.metadata_columns.split(",") if c.strip())
    out = {"subgroups": {"split": split} | subgroups.subgroups(
        labels, probs, files, table, path, *args, columns=columns)}
    missing = out["subgroups"]["missing"]["count"]
    if missing:
        logging.warning("%d of %d evaluated images are not in %s (listed in metrics.json)",
                        missing, len(files), path)
    header = next(iter(table.values()), {})
    if e.shortcut_column and e.shortcut_column in header:
        out["shortcut"] = {"split": split} | subgroups.shortcut_audit(
            labels, probs, files, table, path, e.shortcut_column, *args,
            overall=out["subgroups"]["overall"])
    elif e.shortcut_column:
        logging.info("no shortcut audit: %s has no column %r", path, e.shortcut_column)
    return out


def log_findings(metrics: dict):
    """The sections' headlines in the log: subgroups below the overall value, the shortcut
    audit, and whether Grad-CAM beats chance."""
    sub = metrics.get("subgroups")
    for column, groups in (sub["columns"] if sub else {}).items():
        for value, group in groups.items():
            for name in group["below_overall"]:
                low, high = group["ci95"][name]
                logging.warning("subgroup %s=%s: %s %.3f [%.3f, %.3f], wholly below the overall "
                                "%.3f", column, value, name, group["metrics"][name], low, high,
                                sub["overall"]["metrics"][name])
    cut = metrics.get("shortcut")
    if cut and "roc_auc" in cut["without"]["metrics"]:
        logging.info("without %s: ROC AUC %.3f on %d images (all images: %.3f)", cut["column"],
                     cut["without"]["metrics"]["roc_auc"], cut["without"]["n"],
                     cut["all"]["metrics"].get("roc_auc", float("nan")))
    loc = metrics.get("localization")
    if loc and loc.get("n"):
        mean, beats = loc["mean"], loc["beats_chance"]
        logging.info("Grad-CAM on %d fractured images: pointing game %.3f, mass in boxes %.3f, "
                     "chance %.3f; above chance: pointing %s, mass %s", loc["n"],
                     mean["pointing"], mean["mass"], mean["chance"], beats["pointing"],
                     beats["mass"])


def _stored_sizes(prepared: str, split: str, indices) -> list[tuple[int, int]]:
    """(width, height) of the stored images ``indices`` of ``split``, from the prepared copy
    of their original bytes."""
    source = data_sources(prepared)[split]
    out = []
    for i in indices:
        example = source[int(i)]
        out.append(image_size(example["image"], str(example["filename"])))
    return out


def model_images(source, indices, side: int) -> np.ndarray:
    """The source's examples ``indices`` as the model sees them, (N, side, side, 3) float."""
    return np.asarray(model_input(np.stack([example_at(source, int(i))[0] for i in indices]),
                                  side))


def heat_maps(model, variables, source, indices, side: int) -> np.ndarray:
    """Grad-CAM maps (N, side, side) of the source's examples ``indices``."""
    maps = []
    for start in range(0, len(indices), GRADCAM_CHUNK):
        chunk = list(indices[start:start + GRADCAM_CHUNK])
        pad = chunk + [chunk[-1]] * (GRADCAM_CHUNK - len(chunk))
        heat, _ = grad_cam(model, variables, jnp.asarray(model_images(source, pad, side)))
        maps.append(np.asarray(heat)[:len(chunk)])
    return np.concatenate(maps) if maps else np.zeros((0, side, side), np.float32)


def localization_section(config, root: str, prepared: str, member, split: str, source,
                         labels, probs, out_dir: str) -> tuple[dict, dict]:
    """(``{"localization": ...}``, figures) for the box table the config names (none: {}):
    every fractured image of ``split`` with boxes scored, per image into
    ``localization_<split>.csv``."""
    e = config.eval
    path = table_path(e.boxes, root, BOXES)
    if path is None:
        return {}, {}
    boxes = localization.read_boxes(path)
    files = file_names(source)
    fractured = np.flatnonzero(np.asarray(labels) == 1)
    keys = [table_key(files[i]) for i in fractured]
    picked = np.array([i for i, k in zip(fractured, keys) if k in boxes], int)
    without = [files[i] for i, k in zip(fractured, keys) if k not in boxes]
    result = {"table": path, "split": split, "model": member.name, "fractured": len(fractured),
              "without_boxes": {"count": len(without), "files": without}}
    if fractured.size and not picked.size:
        raise UserError(
            f"{path}: no box matches a fractured {split} image; its 'file' column must be the "
            f"path relative to the data root (table: {next(iter(boxes), '-')!r}, images: "
            f"{files[fractured[0]]!r})")
    if not picked.size:  # no fractured image in the split
        return {"localization": result | {"n": 0}}, {}
    side = member.config.model.image_size
    sizes = _stored_sizes(prepared, split, picked)
    drawn = [boxes[table_key(files[i])] for i in picked]
    masks = np.stack([localization.box_mask(b, w, h, side) for b, (w, h) in zip(drawn, sizes)])
    heat = heat_maps(member.model, member.variables, source, picked, side)
    per_image = localization.score_maps(heat, masks)
    result |= localization.summarise(per_image, e.bootstrap, config.seed)
    write_csv(os.path.join(out_dir, f"localization_{split}.csv"),
              ["file", "probability", "width", "height", "boxes", "chance", "pointing", "mass",
               "peak_row", "peak_col"],
              ([files[i], f"{probs[i]:.6f}", *sizes[k], len(drawn[k]),
                f"{per_image['chance'][k]:.6f}", int(per_image["pointing"][k]),
                f"{per_image['mass'][k]:.6f}", int(per_image["peak_row"][k]),
                int(per_image["peak_col"][k])] for k, i in enumerate(picked)))
    show = _spread(per_image["mass"], e.localization_overlays)
    figure = plots.image_grid(
        model_images(source, picked[show], side),
        [f"{'hit' if per_image['pointing'][k] else 'miss'}, mass in boxes "
         f"{per_image['mass'][k]:.2f}\np={probs[picked[k]]:.2f}" for k in show],
        os.path.join(out_dir, "localization.png"), heat=heat[show],
        boxes=[_scaled(drawn[k], *sizes[k], side) for k in show])
    return {"localization": result}, {f"Grad-CAM and fracture boxes ({split})": figure}


def _spread(values, count: int) -> list[int]:
    """Up to ``count`` indices evenly spread over ``values`` sorted from high to low."""
    order = np.argsort(-np.asarray(values), kind="stable")
    if len(order) <= count:
        return order.tolist()
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)].tolist()


def _scaled(boxes, width, height, side) -> list:
    """Boxes in pixels of the stored image -> in pixels of the model's input."""
    sx, sy = side / width, side / height
    return [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in boxes]
