"""Wall time of a frozen-backbone training run with and without cached backbone features.

    python benchmarks/frozen_training.py --data ../shared/data/fracatlas [--models resnet50]
        [--epochs 3]

For each model, ``train_and_evaluate`` runs twice in this invocation on the same prepared
data, the whole backbone frozen and augmentation off: once with ``train.cache_features=off``
(the backbone runs in every step and every val pass) and once with the cache (``force`` for
EfficientNet, whose drop-connect the cache leaves off). One JSON line per run: wall time,
train images per second of wall time, and the history; a last line per model gives the ratio
and the largest relative difference between the two histories (for EfficientNet a real one: the
uncached run drops paths at random, the cached one does not). Random weights (the speed does not
depend on them); the final val/test scoring through the full model is part of both runs.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fracture_jax.kernels.host_memory import restart_with_tunables  # noqa: E402

if __name__ == "__main__":
    restart_with_tunables()  # as main.py does

from configs import default  # noqa: E402
from fracture_jax.data import dataset  # noqa: E402
from fracture_jax.data.synthetic import write_phantoms  # noqa: E402
from fracture_jax.models import get_spec  # noqa: E402
from fracture_jax.train import train_and_evaluate  # noqa: E402


def config_for(model: str, data: str, prepared: str, epochs: int, cache: str, batch: int):
    c = default.get_config()
    c.data.root, c.data.prepared_dir = data, prepared
    c.model.name, c.model.pretrained = model, None
    c.train.freeze, c.train.epochs, c.train.patience = "all", epochs, epochs
    c.train.batch_size, c.train.cache_features, c.train.log_every = batch, cache, 10**6
    c.train.checkpoint_every = 0
    c.data.augment.flip = False
    for key in ("rotate_deg", "zoom", "brightness", "contrast"):
        c.data.augment[key] = 0.0
    return c


def run(config, workdir: str) -> dict:
    start = time.perf_counter()
    train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    history = json.loads((Path(workdir) / "history.json").read_text())
    return {"model": config.model.name, "cache_features": config.train.cache_features,
            "epochs": config.train.epochs, "wall_s": round(wall, 1), "history": history}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="", help="image folder (default: generated phantoms)")
    p.add_argument("--models", default="resnet50,efficientnetb2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data or str(write_phantoms(Path(tmp) / "phantoms", 120, 256, seed=0))
        prepared = str(Path(tmp) / "tfds")
        _, sources = dataset.load(config_for("resnet50", root, prepared, 1, "off", a.batch), tmp)
        images = len(sources["train"]) // a.batch * a.batch * a.epochs  # prepared: not timed
        for model in a.models.split(","):
            cached_mode = "force" if get_spec(model).drops_paths else "auto"
            records = []
            for cache in ("off", cached_mode):
                config = config_for(model, root, prepared, a.epochs, cache, a.batch)
                records.append(run(config, str(Path(tmp) / f"{model}-{cache}")))
                records[-1]["train_images_per_wall_s"] = round(images / records[-1]["wall_s"], 2)
                print(json.dumps(records[-1]), flush=True)
            diff = max(abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-30)
                       for x, y in zip(records[0]["history"], records[1]["history"]) for k in x)
            print(json.dumps({"model": model, "speedup": round(records[0]["wall_s"]
                                                               / records[1]["wall_s"], 2),
                              "max_history_relative_difference": diff}), flush=True)


if __name__ == "__main__":
    main()
