"""Images/s of the train input pipeline (decode + resize + augment + batch) per worker count.

    python benchmarks/loader_speed.py --data ../shared/data/fracatlas [--workers 0,1,2]

Prepares the folder into a temporary TFDS copy once, then times ``--batches`` batches after
``--warmup`` for each worker count, printing one JSON line each (median of ``--repeats``).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fracture_jax.data.builder import data_sources, prepare  # noqa: E402
from fracture_jax.data.pipeline import Augment, train_dataset  # noqa: E402


def measure(source, workers, size, batch, batches, warmup, seed):
    it = iter(train_dataset(source, size, batch, seed, Augment(), num_workers=workers,
                            prefetch=2))
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/fracatlas"))
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--size", type=int, default=260)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(a.data, tmp)
        source = data_sources(tmp)["train"]
        for workers in (int(w) for w in a.workers.split(",")):
            rates = [measure(source, workers, a.size, a.batch, a.batches, a.warmup, seed)
                     for seed in range(a.repeats)]
            print(json.dumps({"bench": "train_pipeline", "workers": workers, "image_size": a.size,
                              "batch": a.batch, "img_per_s_median": float(np.median(rates)),
                              "img_per_s_runs": rates, "cores": os.cpu_count(),
                              "data": os.path.abspath(a.data)}), flush=True)


if __name__ == "__main__":
    main()
