"""grain pipelines over the decoded data set: a seeded, endless train stream and eval passes
that see every example exactly once (the last batch padded, with a mask). Batches hold the
stored uint8 images; the device augments and resizes them (``fracture_jax.augment``)."""

import ctypes
import dataclasses
import functools
import multiprocessing
import os
import signal
import sys

import grain
import jax
import numpy as np
from absl import flags

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>



def example_at(source, index: int) -> tuple[np.ndarray, int, str]:
    """(image (S, S, 3) float as the model sees it in eval, label, file name) of one example of
    a decoded source."""
    example = source[index]
    return example["image"].astype(np.float32), int(example["label"]), source.filenames[index]


def file_names(source) -> list[str]:
    """The file name of every example, in the order eval passes see them."""
    return list(source.filenames)


def _eval_example(index, example):
    return {"image": example["image"], "label": np.int32(example["label"]),
            "mask": np.bool_(True), "index": np.int32(index)}


def _host_shard(ds: grain.MapDataset) -> grain.MapDataset:
    return ds[jax.process_index()::jax.process_count()]


def _die_with_parent(worker_index: int, worker_count: int):
    """In a grain worker: be killed when the process that started it dies, even by SIGKILL
    (Linux; elsewhere the worker notices its parent is gone on its next read)."""
    del worker_index, worker_count
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # it died before that line
            os._exit(1)


def _iterate(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, 2 * prefetch),
                                              prefetch_buffer_size=4 * prefetch))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (notebooks, scripts)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=prefetch),
                            worker_init_fn=_die_with_parent)
    return it


@dataclasses.dataclass(frozen=True)
class _ProcessRows:
    """Element ``k`` of this process's stream: row ``k % local`` of its ``local`` rows in global
    batch ``k // local`` of ``stream``."""
    stream: grain.MapDataset
    global_batch: int
    local: int
    process: int

    def __call__(self, k):
        batch, row = divmod(int(k), self.local)
        return self.stream[batch * self.global_batch + self.process * self.local + row]


@dataclasses.dataclass(frozen=True)
class _Take:
    """Element ``i`` of a subset of ``ds``: ``ds[indices[i]]``."""
    ds: grain.MapDataset
    indices: np.ndarray

    def __call__(self, i):
        return self.ds[int(self.indices[i])]


def _balanced(ds: grain.MapDataset, labels: np.ndarray, seed: int) -> grain.MapDataset:
    """Each class's examples in an endless stream of its own, shuffled anew each time round,
    the two interleaved half and half (grain's mix): every batch holds both classes equally."""
    from fracture_jax.errors import UserError
    streams = []
    for c in (0, 1):
        members = np.flatnonzero(np.asarray(labels) == c)
        if not len(members):
            raise UserError("data.sampling=balanced needs images of both classes in train/")
        streams.append(grain.MapDataset.range(len(members)).map(_Take(ds, members))
                       .seed(seed + c).shuffle().repeat())
    return grain.MapDataset.mix(streams, [0.5, 0.5])


def _train_stream(ds: grain.MapDataset, transform, seed: int, batch_size: int,
                  skip_batches: int, balanced_labels=None) -> grain.MapDataset:
    """This process's rows of an endless stream of global batches of ``batch_size``: ``ds``
    shuffled anew each epoch (or drawn class-balanced, given the labels) and
    ``transform``-ed, from batch ``skip_batches`` on. Every process count sees the same global
    batches (a process takes its own block of rows)."""
    stream = (ds.seed(seed).shuffle().repeat() if balanced_labels is None
              else _balanced(ds, balanced_labels, seed)).map(transform)
    local, count = batch_size // jax.process_count(), jax.process_count()
    if count > 1:
        rows = _ProcessRows(stream, batch_size, local, jax.process_index())
        stream = grain.MapDataset.range(len(stream) // batch_size * local).map(rows)
    return stream[skip_batches * local:].batch(local, drop_remainder=True)


def _train_example(example):
    return {"image": example["image"], "label": np.int32(example["label"])}


def train_dataset(source, batch_size: int, seed: int, num_workers: int = 0, prefetch: int = 2,
                  skip_batches: int = 0, balanced: bool = False) -> grain.IterDataset:
    """Endless shuffled batches of ``batch_size // process_count`` stored uint8 images (a
    decoded source: augmentation happens on the device, in the step).

    Each epoch is shuffled anew from ``seed`` and the position in the stream, so the stream is
    the same in every run and its iterator state can be saved. ``skip_batches`` starts it later
    (a training phase continues where the one before ended). ``balanced``: each batch half
    fractured, half not (``data.sampling=balanced``).
    """
    ds = _train_stream(grain.MapDataset.source(source), _train_example, seed, batch_size,
                       skip_batches, source.labels if balanced else None)
    return _iterate(ds, num_workers, prefetch)


@dataclasses.dataclass(frozen=True)
class _CachedExample:
    features: np.ndarray  # (examples, C): one row per example of the source, in its order
    labels: np.ndarray

    def __call__(self, index):
        return {"image": self.features[index], "label": self.labels[index]}


def cached_train_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                         skip_batches: int = 0, balanced: bool = False) -> grain.IterDataset:
    """``train_dataset``'s stream without augmentation, example for example in the same order,
    with each example's precomputed backbone features (a row of ``features``) as its "image"."""
    ds = _train_stream(grain.MapDataset.range(len(features)), _CachedExample(features, labels),
                       seed, batch_size, skip_batches, labels if balanced else None)
    return ds.to_iter_dataset()


def cached_eval_batches(features: np.ndarray, labels: np.ndarray, batch_size: int):
    """``eval_dataset``'s batches (in order, the last zero-padded, ``mask`` marking real
    examples) over precomputed backbone features."""
    for start in range(0, len(features), batch_size):
        rows = range(start, min(start + batch_size, len(features)))
        yield _pad_batch([{"image": features[i], "label": labels[i], "mask": np.bool_(True),
                           "index": np.int32(i)} for i in rows], batch_size)


def _pad_batch(examples, batch_size: int):
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    short = batch_size - len(examples)
    if short:
        batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
    return batch


def eval_dataset(source, batch_size: int, num_workers: int = 0,
                 prefetch: int = 2) -> grain.IterDataset:
    """Every example of this host's shard once, in order, in batches of ``batch_size //
    process_count``; the last batch is zero-padded and ``mask`` marks the real examples."""
    local = batch_size // jax.process_count()
    ds = _host_shard(grain.MapDataset.source(source).map_with_index(_eval_example))
    ds = ds.batch(local, batch_fn=functools.partial(_pad_batch, batch_size=local))
    return _iterate(ds, num_workers, prefetch)
