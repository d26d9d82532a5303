"""grain pipelines over the decoded data set: a seeded, endless train stream and eval passes
that see every example exactly once (the last batch padded, with a mask). A grain element is a
whole batch, read from its source in one call (``source.take(indices)``), so the host spends
next to nothing per image. Batches hold the stored uint8 images; the device augments and
resizes them (``fracture_jax.augment``)."""

import ctypes
import dataclasses
import functools
import multiprocessing
import os
import signal
import sys
from typing import Any

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
    """``ds``'s batches read ahead: ``prefetch`` at a time by threads, or by ``num_workers``
    processes."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                              prefetch_buffer_size=2 * prefetch))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (notebooks, scripts)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=prefetch),
                            worker_init_fn=_die_with_parent)
    return it


_ENDLESS = 2 ** 40  # batches in the "endless" train stream


@functools.lru_cache(maxsize=8)  # the epochs (or per-class rounds) batches straddle
def _permutation(n: int, seed: int, round_: int) -> np.ndarray:
    return np.random.default_rng([seed, round_]).permutation(n)


def _shuffled(n: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Elements ``positions`` of ``range(n)`` repeated endlessly, each round in a new order
    drawn from ``seed`` and the round."""
    rounds, within = np.divmod(positions, n)
    out = np.empty_like(positions)
    for r in np.unique(rounds):
        at = rounds == r
        out[at] = _permutation(n, seed, int(r))[within[at]]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _Order:
    """The example at each position of the endless train stream: every example once an epoch,
    in a new order each epoch. Given each class's ``members`` (balanced sampling), even
    positions go round the not-fractured examples and odd ones the fractured, each class in a
    new order each time round."""
    size: int
    seed: int
    members: tuple = ()

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if not self.members:
            return _shuffled(self.size, self.seed, positions)
        out = np.empty_like(positions)
        for c, members in enumerate(self.members):
            at = positions % 2 == c
            out[at] = members[_shuffled(len(members), self.seed + c, positions[at] // 2)]
        return out


def _order(labels: np.ndarray, seed: int, balanced: bool) -> _Order:
    if not balanced:
        return _Order(len(labels), seed)
    from fracture_jax.errors import UserError
    members = tuple(np.flatnonzero(np.asarray(labels) == c) for c in (0, 1))
    if not all(len(m) for m in members):
        raise UserError("data.sampling=balanced needs images of both classes in train/")
    return _Order(len(labels), seed, members)


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
    """Batch ``b`` of this process's stream: its ``local`` rows of global batch ``b``."""
    source: Any
    order: _Order
    global_batch: int
    local: int
    process: int

    def __call__(self, b) -> dict:
        first = int(b) * self.global_batch + self.process * self.local
        batch = self.source.take(self.order(np.arange(first, first + self.local)))
        return {"image": batch["image"], "label": np.asarray(batch["label"], np.int32)}


def _train_batches(source, batch_size: int, seed: int, skip_batches: int,
                   balanced: bool) -> grain.MapDataset:
    """This process's rows of an endless stream of global batches of ``batch_size``, from
    batch ``skip_batches`` on. Every process count sees the same global batches (a process
    takes its own block of rows)."""
    local = batch_size // jax.process_count()
    read = _TrainBatch(source, _order(source.labels, seed, balanced), batch_size, local,
                       jax.process_index())
    return grain.MapDataset.range(skip_batches, _ENDLESS).map(read)


def train_dataset(source, batch_size: int, seed: int, num_workers: int = 0, prefetch: int = 2,
                  skip_batches: int = 0, balanced: bool = False) -> grain.IterDataset:
    """Endless shuffled batches of ``batch_size // process_count`` stored uint8 images (a
    decoded source: augmentation happens on the device, in the step).

    Each epoch is shuffled anew from ``seed`` and the epoch, so the stream is the same in every
    run and its iterator state can be saved. ``skip_batches`` starts it later (a training
    phase continues where the one before ended). ``balanced``: each batch half fractured,
    half not (``data.sampling=balanced``).
    """
    return _iterate(_train_batches(source, batch_size, seed, skip_batches, balanced),
                    num_workers, prefetch)


@dataclasses.dataclass(frozen=True, eq=False)
class _Features:
    """Precomputed backbone features as a source: row ``i`` is example ``i``'s "image"."""
    features: np.ndarray  # (examples, C)
    labels: np.ndarray

    def take(self, indices) -> dict:
        return {"image": self.features[indices], "label": self.labels[indices]}


def cached_train_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                         skip_batches: int = 0, balanced: bool = False) -> grain.IterDataset:
    """``train_dataset``'s stream without augmentation, example for example in the same order,
    with each example's precomputed backbone features (a row of ``features``) as its "image"."""
    return _train_batches(_Features(features, labels), batch_size, seed, skip_batches,
                          balanced).to_iter_dataset()


@dataclasses.dataclass(frozen=True, eq=False)
class _EvalBatch:
    """Batch ``b`` of a pass over examples ``indices`` of ``source``, ``size`` at a time: the
    last zero-padded, ``mask`` marking the real examples and ``index`` their place in the
    source."""
    source: Any
    indices: np.ndarray
    size: int

    def __len__(self) -> int:
        return -(-len(self.indices) // self.size)

    def __call__(self, b) -> dict:
        rows = self.indices[int(b) * self.size:(int(b) + 1) * self.size]
        batch = self.source.take(rows)
        batch = {"image": batch["image"], "label": np.asarray(batch["label"], np.int32),
                 "mask": np.ones(len(rows), bool), "index": rows.astype(np.int32)}
        short = self.size - len(rows)
        return {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) if short
                else v for k, v in batch.items()}


def cached_eval_batches(features: np.ndarray, labels: np.ndarray, batch_size: int):
    """``eval_dataset``'s batches (in order, the last zero-padded, ``mask`` marking real
    examples) over precomputed backbone features."""
    read = _EvalBatch(_Features(features, labels), np.arange(len(labels)), batch_size)
    return map(read, range(len(read)))


def eval_dataset(source, batch_size: int, num_workers: int = 0,
                 prefetch: int = 2) -> grain.IterDataset:
    """Every example of this host's shard once, in order, in batches of ``batch_size //
    process_count``; the last batch is zero-padded and ``mask`` marks the real examples."""
    shard = np.arange(jax.process_index(), len(source), jax.process_count())
    read = _EvalBatch(source, shard, batch_size // jax.process_count())
    return _iterate(grain.MapDataset.range(len(read)).map(read), num_workers, prefetch)
