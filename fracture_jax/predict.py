"""``--mode=predict``: probabilities for image files, folders or globs, as a CSV.

Each file is decoded on its own; a file that cannot be read gets a row with its error and the
others go on. The label uses the operating threshold that ``--mode=eval`` chose on val
(``<workdir>/eval/threshold.json``); a run never evaluated is refused with the command to run.
"""

import csv
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from fracture_jax import parallel, plots
from fracture_jax.data.decode import resize
from fracture_jax.data.decode import DecodeError, decode
from fracture_jax.data.scan import JUNK_FILES
from fracture_jax.errors import UserError
from fracture_jax.evaluate import load_member, read_threshold, sigmoid
from fracture_jax.files import atomic_path
from fracture_jax.gradcam import grad_cam
from fracture_jax.inference import make_forward, mesh_multiple

FIELDS = ("file", "probability", "label", "threshold", "error")


def expand(spec: str) -> list[str]:
    """Files named by ``spec``: one file, a folder (every visible file below it, DICOM files
    often having no suffix) or a glob."""
    if os.path.isdir(spec):
        found = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                 if not f.startswith(".") and f not in JUNK_FILES]
    elif os.path.isfile(spec):
        found = [spec]
    else:
        found = glob.glob(os.path.expanduser(spec), recursive=True)
    if not found:
        raise UserError(f"--images={spec}: no such file, and no files in such a folder or glob")
    return sorted(found)


def load_image(path: str, size: int) -> np.ndarray:
    """The image as the model sees it (raises DecodeError naming the file)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DecodeError(f"{path}: cannot read ({e.strerror})") from e
    return resize(decode(data, path, draft_size=2 * size), size)


def predict_files(config, workdir: str, images: str | None) -> str:
    """Write the CSV (and Grad-CAM PNGs if asked); return the CSV's path."""
    if not images:
        raise UserError("--mode=predict needs --images=<file, folder or glob>")
    files = expand(images)
    member = load_member(workdir)
    size = member.config.model.image_size
    threshold = float(read_threshold(workdir)["value"])
    mesh = parallel.make_mesh()
    forward = make_forward(member.model, mesh, size)
    variables = parallel.replicate(member.variables, mesh)
    batch = mesh_multiple(config.eval.batch_size, mesh)
    output = config.predict.output or os.path.join(workdir, "predictions.csv")
    cam_dir = os.path.splitext(output)[0] + "_gradcam"
    if config.predict.gradcam:
        os.makedirs(cam_dir, exist_ok=True)
    rows, failed = [], 0
    for start in range(0, len(files), batch):
        good, arrays = [], []
        for path in files[start:start + batch]:
            try:
                arrays.append(load_image(path, size))
                good.append(path)
            except DecodeError as e:
                failed += 1
                rows.append({"file": path, "error": str(e)})
        if not good:
            continue
        x = np.zeros((batch, size, size, 3), np.float32)
        x[:len(good)] = np.stack(arrays)
        logits = forward(variables, parallel.shard_batch({"image": x}, mesh)["image"])
        probs = sigmoid(parallel.to_host(logits))[:len(good)]  # (each process sent the batch)
        rows += [{"file": p, "probability": f"{q:.6f}", "label":
                  "fractured" if q >= threshold else "not_fractured",
                  "threshold": f"{threshold:.6f}", "error": ""} for p, q in zip(good, probs)]
        if config.predict.gradcam and jax.process_index() == 0:
            heat, _ = grad_cam(member.model, member.variables, jnp.asarray(x[:len(good)]))
            for path, img, h, q in zip(good, x, np.asarray(heat), probs):
                stem = os.path.splitext(os.path.basename(path))[0]
                plots.image_grid(img[None], [f"{stem[:30]}: p={q:.2f}"],
                                 os.path.join(cam_dir, f"{stem}.png"), heat=h[None], cols=1)
    order = {path: i for i, path in enumerate(files)}
    rows.sort(key=lambda r: order[r["file"]])
    if jax.process_index() != 0:  # every process predicted; the first one writes
        return output
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"predictions for {len(files) - failed} of {len(files)} files in {output}"
          + (f" ({failed} could not be read: see the error column)" if failed else ""))
    return output
