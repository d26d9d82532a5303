"""Images/s of the train input pipeline: JPEG decoding per epoch against the decoded copy.

    python benchmarks/loader_speed.py --data ../shared/data/fracatlas [--workers 0,1,2]

Prepares the folder into a temporary TFDS copy and decodes it once (the decoded copy's build
time is printed too), then times ``--batches`` batches after ``--warmup`` for each path and
worker count, one JSON line each (median of ``--repeats``):

- ``jpeg``: what every epoch did before the decoded copy: each image's original bytes decoded
  and resized (PIL) in the pipeline; its PIL augmentation, now on the device, is left out, so
  this path's figure is an upper bound of what it was;
- ``decoded``: the train stream of the decoded copy (uint8 arrays read and batched).

With ``workers`` 0 and ``--prefetch 0`` (the default) everything runs in this process's one
thread: the figure is per core. ``img_per_cpu_s`` divides by the process's CPU time instead of
the wall time (worker processes not counted).
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grain  # noqa: E402
import numpy as np  # noqa: E402

from fracture_jax.data.builder import data_sources, dataset_dir, prepare  # noqa: E402
from fracture_jax.data.decode import decode, resize  # noqa: E402
from fracture_jax.data.decoded import prepare_decoded  # noqa: E402
from fracture_jax.data.pipeline import _iterate, train_dataset  # noqa: E402


def _jpeg_example(example, size):
    name = example["filename"].decode()
    return {"image": resize(decode(example["image"], name, draft_size=2 * size), size),
            "label": np.int32(example["label"])}


def jpeg_stream(source, size, batch, seed, workers, prefetch):
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ds.map(functools.partial(_jpeg_example, size=size)).batch(batch, drop_remainder=True)
    return iter(_iterate(ds, workers, prefetch))


def measure(it, batch, batches, warmup) -> tuple[float, float]:
    """(images per second of wall time, per second of this process's CPU time)."""
    for _ in range(warmup):
        next(it)
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    images = batches * batch
    return images / (time.perf_counter() - t), images / max(time.process_time() - cpu, 1e-9)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/fracatlas"))
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--size", type=int, default=260)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=0,
                   help="read-ahead threads (0: in the timing thread itself)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(a.data, tmp)
        originals = data_sources(tmp)
        t = time.perf_counter()
        decoded = prepare_decoded(dataset_dir(Path(tmp)), originals, a.size)
        images = sum(len(s) for s in decoded.values())
        print(json.dumps({"bench": "decode_once", "images": images, "image_size": a.size,
                          "seconds": round(time.perf_counter() - t, 2),
                          "threads": os.cpu_count()}), flush=True)
        for workers in (int(w) for w in a.workers.split(",")):
            for path in ("jpeg", "decoded"):
                rates, cpu_rates = [], []
                for seed in range(a.repeats):
                    it = (jpeg_stream(originals["train"], a.size, a.batch, seed, workers,
                                      a.prefetch)
                          if path == "jpeg" else
                          iter(train_dataset(decoded["train"], a.batch, seed, workers,
                                             a.prefetch)))
                    rate, cpu_rate = measure(it, a.batch, a.batches, a.warmup)
                    rates.append(rate)
                    cpu_rates.append(cpu_rate)
                    it.close()
                print(json.dumps({"bench": "train_pipeline", "path": path, "workers": workers,
                                  "image_size": a.size, "batch": a.batch,
                                  "img_per_s_median": round(float(np.median(rates)), 1),
                                  "img_per_s_runs": [round(r, 1) for r in rates],
                                  "img_per_cpu_s_median": round(float(np.median(cpu_rates)), 1),
                                  "prefetch": a.prefetch,
                                  "cores": os.cpu_count(),
                                  "data": os.path.abspath(a.data)}), flush=True)


if __name__ == "__main__":
    main()
