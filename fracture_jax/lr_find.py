"""The learning-rate range test (``--mode=lr_find``): train from the run's starting point (its
first phase: the same model, frozen layers, optimizer, augmentation and batches) while the
rate grows exponentially from ``lr_find.min_lr`` to ``lr_find.max_lr``, and suggest the rate
where the smoothed loss falls fastest (Smith's test, as fastai's ``lr_find`` reports it).

Nothing is restored or saved: the sweep starts from the initial weights, writes only
``<workdir>/lr_find/`` (``lr_find.json``, ``lr_find.png``) and stops early once the smoothed
loss passes ``stop_factor`` times its minimum.
"""

import math
import os

import jax
import numpy as np
from absl import logging

from fracture_jax import parallel, plots
from fracture_jax.data import dataset
from fracture_jax.data.pipeline import train_dataset
from fracture_jax.errors import UserError
from fracture_jax.files import write_json
from fracture_jax.models import builder
from fracture_jax.train import (TrainState, accumulate_steps, make_optimizer, make_train_step,
                                phases, sampling_balanced, split_params)


def suggestion(lrs, smoothed) -> float:
    """The rate where the smoothed loss falls fastest against log(rate), before its minimum
    (anywhere in the sweep when the minimum comes in its first three steps), the sweep's
    first tenth left out as fastai does (the smoothing has not settled there)."""
    lrs, smoothed = np.asarray(lrs), np.asarray(smoothed)
    end = int(np.argmin(smoothed)) + 1
    if end < 3:
        end = len(smoothed)
    start = max(1, len(smoothed) // 10)
    if end - start < 2:
        return float(lrs[0])
    slope = np.gradient(smoothed[:end], np.log(lrs[:end]))
    return float(lrs[start + int(np.argmin(slope[start:]))])


def lr_find(config, workdir: str) -> dict:
    f, k = config.lr_find, accumulate_steps(config)
    if not 0 < f.min_lr < f.max_lr or f.steps < 3 * k:
        raise UserError("lr_find: use 0 < min_lr < max_lr and at least 3 updates' steps")
    mesh = parallel.make_mesh()
    _, sources = dataset.load(config, workdir)
    phase = phases(config)[0]
    variables, rescaling = builder.initial_variables(config, jax.random.key(config.seed))
    model = builder.classifier(config, phase.frozen, rescaling)
    updates = f.steps // k
    growth = (f.max_lr / f.min_lr) ** (1.0 / max(1, updates - 1))
    tx = make_optimizer(config, lambda update: f.min_lr * growth ** update)
    step = make_train_step(model, tx, mesh, phase.frozen, config, config.model.image_size)
    trainable, _ = split_params(variables["params"], phase.frozen)
    state = parallel.replicate(TrainState.create(variables["params"], variables["batch_stats"],
                                                 tx.init(trainable)), mesh)
    batches = iter(train_dataset(sources["train"], config.train.batch_size, config.seed,
                                 config.data.num_workers, config.data.prefetch,
                                 balanced=sampling_balanced(config)))
    rng, average = jax.random.key(config.seed), 0.0
    lrs, losses, smoothed = [], [], []
    try:
        for i in range(updates * k):
            state, loss, _ = step(state, parallel.shard_batch(next(batches), mesh), rng)
            loss = float(loss)
            average = f.smoothing * average + (1 - f.smoothing) * loss
            lrs.append(f.min_lr * growth ** (i // k))
            losses.append(loss)
            smoothed.append(average / (1 - f.smoothing ** (i + 1)))
            if not math.isfinite(loss) or smoothed[-1] > f.stop_factor * min(smoothed):
                logging.info("lr_find: stopped at rate %.2e (loss %.4g)", lrs[-1], loss)
                break
    finally:
        batches.close()
    result = {"suggested_lr": suggestion(lrs, smoothed), "min_lr": f.min_lr,
              "max_lr": f.max_lr, "steps": len(lrs), "lr": lrs, "loss": losses,
              "smoothed_loss": smoothed}
    out = os.path.join(workdir, "lr_find")
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "lr_find.json"), result)
        plots.lr_find_plot(lrs, losses, smoothed, result["suggested_lr"],
                           os.path.join(out, "lr_find.png"))
    print(f"lr_find: suggested --config.optimizer.lr={result['suggested_lr']:.2e} (steepest fall "
          f"of the smoothed loss over {len(lrs)} steps); plot {os.path.join(out, 'lr_find.png')}")
    return result
