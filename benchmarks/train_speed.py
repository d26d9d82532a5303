"""Images/s of fracture_jax's train step (full fine-tune, frozen backbone) and inference.

Prints one JSON line per (model, mode): median images/s over timed steps, compile time and
peak resident memory. Random weights and synthetic batches, like the peer scripts.

    python benchmarks/train_speed.py [--models efficientnetb2,resnet50,vgg16] [--modes full,frozen,infer]
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from fracture_jax import parallel  # noqa: E402
from fracture_jax.models import backbone_layers, get_spec  # noqa: E402
from fracture_jax.train import Phase, TrainState, compile_phase, initial_variables  # noqa: E402


def bench(name, mode, size, batch, steps, dtype):
    config = default.get_config()
    config.model.name, config.model.image_size, config.model.dtype = name, size, dtype
    config.train.batch_size = batch
    mesh = parallel.make_mesh()
    layers = backbone_layers(get_spec(name).name)
    frozen = len(layers) if mode == "frozen" else 0
    variables, _ = initial_variables(config, jax.random.key(0))
    program = compile_phase(config, Phase(0, 0, frozen, 1.0), layers, False, 100, mesh)
    state = parallel.replicate(TrainState(jnp.zeros((), jnp.int32), variables["params"],
                                          variables.get("batch_stats", {}),
                                          program.init_opt_state(variables["params"])), mesh)
    rng = np.random.default_rng(0)
    host = {"image": rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 2, batch).astype(np.int32)}
    data = parallel.shard_batch(host, mesh)
    key = jax.random.key(0)
    if mode == "infer":
        def run(state):
            jax.block_until_ready(program.eval_step(state, {"image": data["image"]}))
            return state
    else:
        def run(state):
            state, loss, _ = program.train_step(state, data, key)
            jax.block_until_ready(loss)
            return state
    t = time.perf_counter()
    state = run(state)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state = run(state)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"framework": "fracture_jax", "model": name, "mode": mode, "image_size": size,
            "batch": batch, "dtype": dtype, "img_per_s_median": batch / med,
            "step_s_median": med, "compile_s": compile_s, "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "backend": jax.default_backend(), "devices": jax.device_count()}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="efficientnetb2,resnet50,vgg16")
    p.add_argument("--modes", default="full,frozen,infer")
    p.add_argument("--size", type=int, default=260)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vgg-train-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    for name in a.models.split(","):
        for mode in a.modes.split(","):
            batch = a.vgg_train_batch if name == "vgg16" and mode != "infer" else a.batch
            print(json.dumps(bench(name, mode, a.size, batch, a.steps, a.dtype)), flush=True)


if __name__ == "__main__":
    main()
