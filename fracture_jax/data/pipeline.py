"""grain pipelines over the prepared dataset: a seeded, augmented, endless train stream and
eval passes that see every example exactly once (the last batch padded, with a mask)."""

import dataclasses
import functools

import grain
import jax
import numpy as np
from absl import flags

from fracture_jax.data.augment import augment, resize
from fracture_jax.data.decode import decode


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation switches and strengths (``config.data.augment`` as a hashable value)."""

    flip: bool = True
    rotate_deg: float = 10.0
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "Augment":
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def _decoded(example, size: int):
    return decode(example["image"], _name(example), draft_size=2 * size), int(example["label"])


def _train_example(example, rng, size: int, aug: Augment):
    img, label = _decoded(example, size)
    return {"image": augment(img, size, rng, aug), "label": np.int32(label)}


def _plain_example(example, size: int):
    img, label = _decoded(example, size)
    return {"image": resize(img, size), "label": np.int32(label)}


def _name(example) -> str:
    name = example["filename"]
    return name.decode() if isinstance(name, bytes) else str(name)


def example_at(source, index: int, size: int) -> tuple[np.ndarray, int, str]:
    """(image (size, size, 3) as the model sees it in eval, label, file name) of one example."""
    example = source[index]
    return _plain_example(example, size)["image"], int(example["label"]), _name(example)


def file_names(source) -> list[str]:
    """The file name of every example, in the order eval passes see them."""
    return [_name(source[i]) for i in range(len(source))]


def _eval_example(example, size: int):
    return _plain_example(example, size) | {"mask": np.bool_(True)}


def _host_shard(ds: grain.MapDataset) -> grain.MapDataset:
    return ds[jax.process_index()::jax.process_count()]


def _iterate(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, 2 * prefetch),
                                              prefetch_buffer_size=4 * prefetch))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (notebooks, scripts)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=prefetch))
    return it


def train_dataset(source, image_size: int, batch_size: int, seed: int,
                  aug: Augment | None = None, num_workers: int = 0,
                  prefetch: int = 2) -> grain.IterDataset:
    """Endless shuffled, augmented batches of ``batch_size // process_count`` examples.

    Each epoch is shuffled anew; every random choice derives from ``seed`` and the position in
    the stream, so the stream is the same in every run and its iterator state can be saved.
    """
    ds = _host_shard(grain.MapDataset.source(source)).seed(seed).shuffle().repeat()
    if aug is None:
        ds = ds.map(functools.partial(_plain_example, size=image_size))
    else:
        ds = ds.random_map(functools.partial(_train_example, size=image_size, aug=aug))
    ds = ds.batch(batch_size // jax.process_count(), drop_remainder=True)
    return _iterate(ds, num_workers, prefetch)


def _pad_batch(examples, batch_size: int):
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    short = batch_size - len(examples)
    if short:
        batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
    return batch


def eval_dataset(source, image_size: int, batch_size: int, num_workers: int = 0,
                 prefetch: int = 2) -> grain.IterDataset:
    """Every example of this host's shard once, in order, in batches of ``batch_size //
    process_count``; the last batch is zero-padded and ``mask`` marks the real examples."""
    local = batch_size // jax.process_count()
    ds = _host_shard(grain.MapDataset.source(source))
    ds = ds.map(functools.partial(_eval_example, size=image_size))
    ds = ds.batch(local, batch_fn=functools.partial(_pad_batch, batch_size=local))
    return _iterate(ds, num_workers, prefetch)
