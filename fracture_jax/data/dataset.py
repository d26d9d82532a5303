"""From a config to ready data: phantoms if asked, the validated TFDS copy of the original
bytes, and the images decoded once (``decoded``), whose sources every pass reads."""

import os
from pathlib import Path

from absl import logging

from fracture_jax import parallel
from fracture_jax.data.builder import data_sources, dataset_dir, prepare
from fracture_jax.data.decoded import prepare_decoded
from fracture_jax.data.scan import LAYOUT
from fracture_jax.data.synthetic import write_phantoms
from fracture_jax.errors import UserError


def data_root(config, workdir: str) -> str:
    """The image folder: ``data.root``, or the phantoms' folder when ``data.synthetic``."""
    root = config.data.root
    if config.data.synthetic:
        root = root or os.path.join(workdir, "phantoms")
        write_phantoms(root, config.data.synthetic_per_class, config.data.synthetic_size,
                       config.seed)
        logging.info("synthetic phantom data set in %s", root)
    elif not root:
        raise UserError(f"no data folder: set --config.data.root=<root> with the layout {LAYOUT} "
                        "(or --config.data.synthetic=True to generate phantoms)")
    return root


def decoded_side(config) -> int:
    return config.data.decoded_side or config.model.image_size


def load(config, workdir: str, side: int | None = None):
    """``(scan report, {split: decoded source})`` for the config's data, preparing the copy
    of the original bytes and decoding it once (at ``side``, default ``decoded_side``) if
    needed."""
    prepared = Path(config.data.prepared_dir or os.path.join(workdir, "tfds")).expanduser()
    with parallel.first_process_first("fracture_jax: data prepared"):
        root = data_root(config, workdir)
        report = prepare(root, str(prepared))
        return report, prepare_decoded(dataset_dir(prepared), data_sources(str(prepared)),
                                       side or decoded_side(config))
