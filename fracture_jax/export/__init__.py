"""``--mode=export``: the best checkpoint of a run as Keras files and an ONNX model.

Writes into ``<workdir>/export/``: ``model.h5`` (legacy Keras weights), ``model.keras``,
``model.onnx`` (preprocessing inside; onnxruntime needs no JAX) and ``model.json`` (what the
files expect and the operating threshold chosen on val). Every file is written under a
temporary name and renamed when complete.
"""

import importlib.util
import json
import os

import jax
import numpy as np
from absl import logging

import fracture_jax
from fracture_jax.data.builder import report_path
from fracture_jax.errors import UserError
from fracture_jax.files import atomic_path, write_json
from fracture_jax.export.keras_files import keras_layer_arrays, write_keras, write_legacy_h5
from fracture_jax.kernels import portable
from fracture_jax.models import get_spec
from fracture_jax.scoring import CLASS_NAMES

FORMATS = {"h5": None, "keras": "keras", "onnx": "onnx"}  # format -> package it needs


def _requested(formats: str, model: str) -> list[str]:
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise UserError(f"export.formats: unknown {', '.join(unknown)}; use h5, keras, onnx")
    missing = [FORMATS[f] for f in wanted if FORMATS[f] and not importlib.util.find_spec(FORMATS[f])]
    if missing:
        raise UserError(f"export to {', '.join(wanted)} needs {', '.join(missing)}: pip install "
                        f"{' '.join(missing)} (or leave them out of --config.export.formats)")
    if get_spec(model).keras_class is None and {"h5", "keras"} & set(wanted):
        raise UserError(f"{model} has no keras.applications architecture; export it with "
                        "--config.export.formats=onnx")
    return wanted


def write_onnx(path: str, model, variables: dict, image_size: int) -> str:
    """The classifier with its preprocessing: float32 RGB 0-255 (1, S, S, 3) in,
    probability of fractured (1,) out."""
    import onnx

    from fracture_jax.export.onnx_graph import to_onnx

    def probability(images):
        return jax.nn.sigmoid(model.apply(variables, images, train=False))

    example = np.zeros((1, image_size, image_size, 3), np.float32)
    with portable():
        proto = to_onnx(probability, example, doc="fracture_jax: probability of fractured")
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return path


def _data_summary(config, workdir: str) -> dict | None:
    path = report_path(config.data.prepared_dir or os.path.join(workdir, "tfds"))
    if not path.is_file():
        return None
    with open(path) as f:
        report = json.load(f)
    return {"counts": report.get("counts"), "skipped_files": len(report.get("skipped", [])),
            "duplicate_groups": len(report.get("duplicates", []))}


def export_run(config, workdir: str) -> dict:
    """Write the requested formats of ``workdir``'s best checkpoint; return {format: path}."""
    from fracture_jax.evaluate import load_member, read_threshold

    member = load_member(workdir)
    run = member.config
    spec = get_spec(run.model.name)
    wanted = _requested(config.export.formats, spec.name)
    threshold = read_threshold(workdir)
    out_dir = os.path.join(workdir, "export")
    os.makedirs(out_dir, exist_ok=True)
    size = run.model.image_size
    rescaling = member.meta.get("imagenet_rescaling", False)
    written = {}
    if "h5" in wanted or "keras" in wanted:
        h5 = write_legacy_h5(os.path.join(out_dir, "model.h5"),
                             keras_layer_arrays(spec.name, member.variables))
        if "h5" in wanted:
            written["h5"] = h5
        if "keras" in wanted:
            written["keras"] = write_keras(os.path.join(out_dir, "model.keras"), spec.name,
                                           size, run.model.dropout, h5, rescaling)
    if "onnx" in wanted:
        written["onnx"] = write_onnx(os.path.join(out_dir, "model.onnx"), member.model,
                                     member.variables, size)
    keras_input = (f"keras.applications.{spec.keras_preprocess}.preprocess_input(RGB 0-255)"
                   if spec.keras_preprocess else "RGB 0-255")
    info = {"model": spec.name, "keras_class": spec.keras_class, "input_size": size,
            "input": {"onnx": "float32 (1, S, S, 3) RGB 0-255, resized as the images in "
                              "training (PIL bilinear); output: probability of fractured",
                      "keras": f"float32 (N, S, S, 3) {keras_input}; output: probability of "
                               "fractured (N, 1)"},
            "threshold": threshold, "class_names": list(CLASS_NAMES),
            "label": "fractured when probability >= threshold",
            "training_data": _data_summary(run, workdir),
            "selected_by": {run.train.early_stop_metric: member.meta.get("best")},
            "files": {k: os.path.basename(v) for k, v in written.items()},
            "fracture_jax": fracture_jax.__version__}
    write_json(os.path.join(out_dir, "model.json"), info)
    if "h5" not in wanted and os.path.exists(os.path.join(out_dir, "model.h5")):
        os.remove(os.path.join(out_dir, "model.h5"))  # only the .keras was asked for
    logging.info("exported %s", ", ".join(f"{k} {v}" for k, v in written.items()))
    print(f"export done: {', '.join(written.values())}, {os.path.join(out_dir, 'model.json')}")
    return written
