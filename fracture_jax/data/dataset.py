"""From a config to ready data: phantoms if asked, the validated TFDS copy of the original
bytes, and the images decoded once (``decoded``), whose sources every pass reads."""

import os
from pathlib import Path

from absl import logging

from fracture_jax import parallel
from fracture_jax.data.builder import REPORT, data_sources, dataset_dir, prepare, read_report
from fracture_jax.data.decoded import prepare_decoded
from fracture_jax.data.scan import LAYOUT, REQUIRED_SPLITS, fingerprint
from fracture_jax.data.synthetic import write_phantoms
from fracture_jax.errors import UserError


def root_path(config, workdir: str) -> str:
    """The image folder the config names (the phantoms' folder when ``data.synthetic``),
    without writing anything."""
    if config.data.synthetic:
        return config.data.root or os.path.join(workdir, "phantoms")
    if not config.data.root:
        raise UserError(f"no data folder: set --config.data.root=<root> with the layout {LAYOUT} "
                        "(or --config.data.synthetic=True to generate phantoms)")
    return config.data.root


def data_root(config, workdir: str) -> str:
    """The image folder: ``data.root``, or the phantoms' folder (written now) when
    ``data.synthetic``."""
    root = root_path(config, workdir)
    if config.data.synthetic:
        write_phantoms(root, config.data.synthetic_per_class, config.data.synthetic_size,
                       config.seed)
        logging.info("synthetic phantom data set in %s", root)
    return root


def decoded_side(config) -> int:
    return config.data.decoded_side or config.model.image_size


def prepared_dir(config, workdir: str) -> Path:
    """Where a run's TFDS copy of its data goes: ``data.prepared_dir``, else ``workdir/tfds``."""
    return Path(config.data.prepared_dir or os.path.join(workdir, "tfds")).expanduser()


def load(config, workdir: str, side: int | None = None, prepared: Path | None = None,
         required: tuple = REQUIRED_SPLITS):
    """``(scan report, {split: decoded source})`` for the config's data, preparing the copy
    of the original bytes (in ``prepared``, default ``prepared_dir``; the folder must have the
    ``required`` splits) and decoding it once (at ``side``, default ``decoded_side``) if
    needed."""
    prepared = prepared or prepared_dir(config, workdir)
    with parallel.first_process_first("fracture_jax: data prepared"):
        root = data_root(config, workdir)
        report = prepare(root, str(prepared), required)
        return report, prepare_decoded(dataset_dir(prepared), data_sources(str(prepared)),
                                       side or decoded_side(config))


def load_as_prepared(config, workdir: str, side: int):
    """``load``'s result for a run's own copy as it was prepared, without scanning the folder
    again (it may have moved or changed; the run trained and chose its threshold on the copy),
    or None when the copy is not there."""
    prepared = prepared_dir(config, workdir)
    out = dataset_dir(prepared)
    if not (out / REPORT).is_file():
        return None
    logging.info("reading the run's data as it was prepared, from %s", out)
    with parallel.first_process_first("fracture_jax: data decoded"):
        return read_report(out), prepare_decoded(out, data_sources(str(prepared)), side)


def cache_dir() -> Path:
    """fracture_jax's folder in the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fracture_jax"


def keyed_prepared_dir(config, root: str) -> Path:
    """Where the copy of a data folder other than the run's goes: named after the folder and
    keyed by its content (so a changed folder gets a new copy, and a moved one keeps its
    copy), under ``data.prepared_dir`` when set, else the user's cache."""
    base = (Path(config.data.prepared_dir).expanduser() if config.data.prepared_dir
            else cache_dir() / "prepared")
    return base / f"{Path(root).expanduser().resolve().name}-{fingerprint(root)[:12]}"
