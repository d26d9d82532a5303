"""The folder as a TFDS dataset: ArrayRecord files holding each image's original bytes.

``prepare(root, data_dir)`` validates the folder (see ``scan``), writes the dataset and the
scan report, and is a no-op when the folder has not changed since. ``tfds.data_source``
reads it back with random access and no TensorFlow.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from fracture_jax.errors import UserError
from fracture_jax.data.scan import (CLASS_NAMES, REQUIRED_SPLITS, ScanReport, find_layout,
                                    fingerprint, scan_folder)

tfds.disable_progress_bar()

NAME = "bone_fractures"
REPORT = "scan_report.json"
_FINGERPRINT = "folder_fingerprint.txt"


class BoneFractures(tfds.core.GeneratorBasedBuilder):
    """X-rays labelled fractured / not fractured, from the seed's folder layout."""

    VERSION = tfds.core.Version("1.0.0")
    required_splits = REQUIRED_SPLITS  # a copy for evaluation needs none in particular
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the image folder as the manual dir (see README)."

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Scalar(dtype=np.object_),  # the file's bytes, as stored
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                "filename": tfds.features.Text(),
            }),
            description=self.__doc__, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        report = scan_folder(root, required=self.required_splits)
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.data_dir) / REPORT).write_text(json.dumps(report.to_json(), indent=1))
        return {split: self._generate_examples(root, ex) for split, ex in report.examples.items()}

    def _generate_examples(self, root, examples):
        for rel, label, _ in examples:
            yield rel, {"image": (root / rel).read_bytes(), "label": label, "filename": rel}


def dataset_dir(data_dir: Path) -> Path:
    return data_dir / NAME / str(BoneFractures.VERSION)


def report_path(data_dir: str) -> Path:
    """Where ``prepare`` keeps the scan report of the data it prepared into ``data_dir``."""
    return dataset_dir(Path(data_dir).expanduser()) / REPORT


def prepare(root: str, data_dir: str, required: tuple = REQUIRED_SPLITS) -> ScanReport:
    """Build (or reuse) the ArrayRecord copy of ``root`` under ``data_dir``; its scan report.
    ``required``: the splits the folder must have."""
    find_layout(root, required)  # layout errors, named, before any work
    data_dir = Path(data_dir).expanduser()
    out = dataset_dir(data_dir)
    stamp = fingerprint(root)
    if (out / _FINGERPRINT).is_file() and (out / _FINGERPRINT).read_text() == stamp:
        logging.info("%s is unchanged since it was prepared into %s", root, out)
    else:
        try:
            _build(root, data_dir, out, required)
        except OSError as e:
            raise UserError(f"cannot write the prepared copy of {root} in {out} ({e.strerror}); "
                            "set --config.data.prepared_dir to a writable folder") from None
        (out / _FINGERPRINT).write_text(stamp)
    return read_report(out)


def _build(root: str, data_dir: Path, out: Path, required: tuple):
    if out.exists():
        logging.info("%s changed since it was prepared: rebuilding %s", root, out)
        shutil.rmtree(out)
    logging.info("preparing %s into %s", root, out)
    builder = BoneFractures(data_dir=str(data_dir), file_format="array_record")
    builder.required_splits = tuple(required)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS' "Downloading ... Unknown size"
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(Path(root).expanduser())))


def read_report(out: Path) -> ScanReport:
    """The scan report of the copy in ``out`` (a ``dataset_dir``), its warnings logged."""
    report = ScanReport(**{k: v for k, v in json.loads((out / REPORT).read_text()).items()
                           if k != "counts"})
    for rel, reason in report.skipped:
        logging.warning("skipped %s: %s", rel, reason)
    for group in report.leakage:
        logging.warning("leakage: the same image is in several splits: %s", ", ".join(group))
    return report


def data_sources(data_dir: str) -> dict:
    """Split -> random-access source of ``{'image', 'label', 'filename'}`` dicts."""
    return tfds.data_source(NAME, data_dir=str(Path(data_dir).expanduser()), download=False)
