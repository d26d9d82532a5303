"""Is the model looking at the fracture: Grad-CAM maps scored against annotated boxes.

A box table is a CSV of ``file, x_min, y_min, x_max, y_max`` in pixels of the stored image
(FracAtlas' ``fracture_boxes.csv`` and the phantoms' format), several rows per file allowed.
Boxes are mapped through the resize the model's input gets (the whole image squashed to
``side`` x ``side``): a model-input pixel is inside when its centre is. For each fractured
image with boxes:

- ``pointing``: 1 when the map's peak (its first maximum, row-major) is inside a box, the
  pointing game of Zhang et al. (2018); a map that is zero everywhere points nowhere: 0;
- ``mass``: the share of the map's sum inside the boxes (0 for an all-zero map);
- ``chance``: the boxes' share of the image, which is both the expected pointing score and the
  mass share of a uniform map, the chance baseline.

Means over images come with bootstrap 95% intervals (``scoring.bootstrap``), as do the paired
differences from chance; "beats chance" means a difference's interval lies wholly above 0.
"""

import csv
import math
import os

import numpy as np

from fracture_jax.errors import UserError
from fracture_jax.scoring import bootstrap
from fracture_jax.subgroups import table_key

COLUMNS = ("x_min", "y_min", "x_max", "y_max")
MEASURES = ("pointing", "mass", "chance")


def read_boxes(path: str) -> dict[str, list[list[float]]]:
    """``{file: [[x_min, y_min, x_max, y_max], ...]}``; a bad row is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (the table of fracture boxes)")
    boxes = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", *COLUMNS} <= set(reader.fieldnames):
            raise UserError(f"{path}: the first row must name the columns file, "
                            f"{', '.join(COLUMNS)} (pixels of the stored image)")
        for line, row in enumerate(reader, start=2):
            try:
                box = [float(row[c]) for c in COLUMNS]
            except (TypeError, ValueError):
                raise UserError(f"{path}, line {line}: {', '.join(COLUMNS)} must be numbers, "
                                f"got {[row[c] for c in COLUMNS]}") from None
            if not (box[2] > box[0] and box[3] > box[1] and all(map(math.isfinite, box))):
                raise UserError(f"{path}, line {line}: an empty box {box} (x_max must exceed "
                                "x_min and y_max y_min)")
            boxes.setdefault(table_key(row["file"]), []).append(box)
    return boxes


def box_mask(boxes: list, width: int, height: int, side: int) -> np.ndarray:
    """(side, side) bool: the model-input pixels whose centre falls in a box of an image
    stored at ``width`` x ``height``. A box smaller than a pixel marks the pixel of its
    centre, so no box vanishes."""
    centre = (np.arange(side) + 0.5) / side
    xs, ys = centre * width, centre * height
    mask = np.zeros((side, side), bool)
    for x0, y0, x1, y1 in boxes:
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        if not inside.any():
            r = min(side - 1, int((y0 + y1) / 2 / height * side))
            c = min(side - 1, int((x0 + x1) / 2 / width * side))
            inside[r, c] = True
        mask |= inside
    return mask


def score_maps(heat, masks) -> dict:
    """Per image: ``pointing``, ``mass``, ``chance`` (see the module), the peak's
    ``peak_row``, ``peak_col``, and whether the map is ``empty`` (zero everywhere)."""
    heat, masks = np.asarray(heat, np.float64), np.asarray(masks, bool)
    flat = heat.reshape(len(heat), -1)
    peak = flat.argmax(axis=1)
    total = flat.sum(axis=1)
    nonzero = total > 0
    inside = masks.reshape(len(masks), -1)
    return {"pointing": (inside[np.arange(len(peak)), peak] & nonzero).astype(np.float64),
            "mass": np.where(nonzero, (flat * inside).sum(axis=1) / np.where(nonzero, total, 1),
                             0.0),
            "chance": inside.mean(axis=1),
            "peak_row": peak // heat.shape[2], "peak_col": peak % heat.shape[2],
            "empty": ~nonzero}


def summarise(per_image: dict, resamples: int, seed: int) -> dict:
    """Means of pointing, mass and chance and the two differences from chance, each with its
    95% interval; whether each beats chance; the count of all-zero maps."""
    values = {m: np.asarray(per_image[m], np.float64) for m in MEASURES}
    values["pointing_minus_chance"] = values["pointing"] - values["chance"]
    values["mass_minus_chance"] = values["mass"] - values["chance"]
    n = len(values["chance"])

    def means(weights):  # (R, n) -> {measure: (R,)}
        return {k: weights @ v / n for k, v in values.items()}

    ci = bootstrap(n, means, resamples, seed)
    return {"n": n, "mean": {k: float(v.mean()) for k, v in values.items()}, "ci95": ci,
            "beats_chance": {"pointing": ci["pointing_minus_chance"][0] > 0,
                             "mass": ci["mass_minus_chance"][0] > 0},
            "empty_maps": int(np.sum(per_image["empty"]))}
