"""How much of the jitted step's speed a real training loop keeps.

For each case prints one JSON line: ``step_img_s`` (the phase's jitted train step alone, on
one batch already on the devices, dispatched ahead as the loop dispatches it: the median over
blocks of the loop's log interval, at least three and ``--steps`` steps in all, timed before
and again after the loop), ``loop_img_s`` (a real ``train_and_evaluate`` epoch through the
loader, from the loop's own progress lines after the first interval, median) and
``loop_efficiency``, their ratio.

    python benchmarks/loop_overhead.py [--cases smallcnn,efficientnetb2_frozen] [--devices 4]
        [--workers 0] [--repeats 3] [--dispatch 1,log] [--baseline /tmp/fracture_jax_old]

Cases: ``smallcnn`` (96 px, batch 64), ``smallcnn_tiny`` (32 px, batch 16: a step of
milliseconds on a 2-core CPU), ``efficientnetb2_frozen`` (260 px, batch 32, random weights,
backbone frozen, augmentation on) and ``efficientnetb2_full`` (260 px, batch 64, fine-tuned
whole: an accelerator's case, e.g. ``JAX_PLATFORMS=cuda python benchmarks/loop_overhead.py
--cases efficientnetb2_full --dtype bfloat16 --workers 8 --repeats 1 --dispatch 1,log``). The
data are phantoms written at the case's size into a temporary folder. ``--dispatch`` lists the
``train.steps_per_dispatch`` values to run each case with (default: 1, the loop's default;
``log``: the case's log interval, one call per progress line); the step figure is always one
step per call. With ``--baseline DIR`` (another checkout, e.g. a ``git worktree`` of an older
commit) each case runs there too, right after. Each case runs ``--repeats`` times, the trees
and dispatch values interleaved, and a ``summary`` line gives the medians: on a 2-core CPU one
run's step figure alone can move by 1.5x.
"""

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # model, image size, batch, freeze, steps per epoch, log every
    "smallcnn": ("smallcnn", 96, 64, "none", 60, 10),
    "smallcnn_tiny": ("smallcnn", 32, 16, "none", 120, 20),  # a step of milliseconds here
    "efficientnetb2_frozen": ("efficientnetb2", 260, 32, "all", 12, 3),
    "efficientnetb2_full": ("efficientnetb2", 260, 64, "none", 60, 10),  # for an accelerator
}


def _config(case: str, root: str, workers: int, dispatch: int = 1, dtype: str = "float32"):
    from configs import default
    model, size, batch, freeze, steps, every = CASES[case]
    c = default.get_config()
    c.data.root, c.data.num_workers = root, workers
    c.model.name, c.model.image_size, c.model.pretrained = model, size, None
    c.model.dtype = dtype
    c.train.batch_size, c.train.freeze, c.train.epochs = batch, freeze, 1
    c.train.steps_per_epoch, c.train.log_every, c.train.checkpoint_every = steps, every, 0
    c.train.cache_features = "off"
    if dispatch > 1:
        if "steps_per_dispatch" not in c.train:
            raise SystemExit("this tree has no train.steps_per_dispatch")
        c.train.steps_per_dispatch = dispatch
    c.eval.after_train = False
    return c


def step_timer(config, steps: int):
    """A function that times the phase's jitted train step on one resident batch, in blocks of
    the loop's log interval (no sync inside a block, as in the loop): images/s of each block."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fracture_jax import parallel
    from fracture_jax.models.builder import frozen_layers, initial_variables
    from fracture_jax.train import Phase, TrainState, compile_phase

    mesh = parallel.make_mesh()
    variables, _ = initial_variables(config, jax.random.key(0))
    phase = Phase(0, 0, frozen_layers(config.model.name, config.train.freeze), 1.0)
    program = compile_phase(config, phase, False, 100, mesh)
    create = getattr(TrainState, "create", None) or (  # (older trees: no create)
        lambda *a: TrainState(jnp.zeros((), jnp.int32), *a))
    state = parallel.replicate(create(variables["params"], variables.get("batch_stats", {}),
                                      program.init_opt_state(variables["params"])), mesh)
    size, batch = config.model.image_size, config.train.batch_size
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8),
            "label": rng.integers(0, 2, batch).astype(np.int32)}
    data = parallel.shard_batch(host, mesh)  # uint8: the models cast their input themselves
    key = jax.random.key(0)
    state = [program.train_step(state, data, key)[0]]  # compile
    every = config.train.log_every

    def rates() -> list[float]:
        found = []
        for _ in range(max(3, steps // every)):  # as the loop runs: dispatched ahead, no sync
            jax.block_until_ready(state[0])
            t = time.perf_counter()
            for _ in range(every):
                out = program.train_step(state[0], data, key)
                state[0] = out[0]
            jax.block_until_ready(out[1])
            found.append(every * batch / (time.perf_counter() - t))
        return found
    return rates


class _Rates(logging.Handler):
    """The images/s of each progress line the loop logs."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def emit(self, record):
        found = re.search(r" ([\d.]+) img/s", record.getMessage())
        if found:
            self.rates.append(float(found.group(1)))


def loop_speed(config, workdir: str) -> float:
    from fracture_jax.train import train_and_evaluate
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)  # (outside absl's app.run it is WARNING)
    rates = _Rates()
    logging.getLogger("absl").addHandler(rates)
    try:
        train_and_evaluate(config, workdir)
    finally:
        logging.getLogger("absl").removeHandler(rates)
    return statistics.median(rates.rates[1:])  # the first interval holds the compilation


def run_case(case: str, a) -> dict:
    from fracture_jax.data.synthetic import write_phantoms
    _, size, batch, _, steps, _ = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(24, steps * batch // 2 + batch)
        root = str(write_phantoms(os.path.join(tmp, "data"), per_class, size, seed=0))
        config = _config(case, root, a.workers, a.dispatch, a.dtype)
        timer = step_timer(config, a.steps)
        before = timer()  # the step is timed before and after the loop, and their blocks'
        loop = loop_speed(config, os.path.join(tmp, "run"))  # median taken: this machine's
        after = timer()  # speed drifts, and one figure taken a minute apart can be off by 2x
    step = statistics.median(before + after)
    import jax
    return {"bench": "loop_overhead", "case": case, "tree": a.tree, "image_size": size,
            "batch": batch, "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "dtype": a.dtype, "workers": a.workers,
            "steps_per_dispatch": int(a.dispatch),
            "step_img_s": round(step, 2), "step_img_s_before_after": [
                round(statistics.median(before), 2), round(statistics.median(after), 2)],
            "loop_img_s": round(loop, 2),
            "loop_efficiency": round(loop / step, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cases", default="smallcnn,efficientnetb2_frozen")
    p.add_argument("--devices", type=int, default=4, help="faked CPU devices (CPU only)")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes")
    p.add_argument("--steps", type=int, default=10, help="timed steps for step_img_s (in blocks of the case's log interval)")
    p.add_argument("--baseline", default="", help="another checkout, run after each case")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each case (and tree), interleaved; a summary line gives the "
                        "medians")
    p.add_argument("--dispatch", default="1",
                   help="train.steps_per_dispatch values, comma-separated; 'log': the case's "
                        "log interval (which should be a multiple of each)")
    p.add_argument("--dtype", default="float32", help="model.dtype (bfloat16 on a GPU or TPU)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    p.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # in a fresh process: the device count is fixed when JAX starts
        a.dispatch = CASES[a.cases][5] if a.dispatch == "log" else int(a.dispatch)
        sys.path.insert(0, a.tree)
        from fracture_jax.kernels.host_memory import restart_with_tunables
        restart_with_tunables()
        print(json.dumps(run_case(a.cases, a)), flush=True)
        return
    variants = [(tree, k) for tree in filter(None, (str(ROOT), a.baseline))
                for k in a.dispatch.split(",")]
    for case in a.cases.split(","):
        runs = {}
        for _ in range(a.repeats):  # interleaved: a slow spell of the machine hits them all
            for variant in variants:
                result = _child(case, *variant, a)
                print(json.dumps(result), flush=True)
                if "error" not in result:
                    runs.setdefault(variant, []).append(result)
        for (tree, _), found in runs.items():
            print(json.dumps({"summary": "loop_overhead", "case": case, "tree": tree,
                              "steps_per_dispatch": found[0]["steps_per_dispatch"],
                              "runs": len(found)} | {
                field: statistics.median(r[field] for r in found)
                for field in ("step_img_s", "loop_img_s", "loop_efficiency")}), flush=True)


def _child(case: str, tree: str, dispatch: str, a) -> dict:
    """One case in a fresh process (the device count is fixed when JAX starts)."""
    env = {k: v for k, v in os.environ.items() if k != "FRACTURE_JAX_RESTARTED"}
    if not any(p in env.get("JAX_PLATFORMS", "cpu") for p in ("cuda", "gpu", "tpu")):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={a.devices}")
    out = subprocess.run([sys.executable, __file__, "--one", "--cases", case, "--workers",
                          str(a.workers), "--steps", str(a.steps), "--tree", tree,
                          "--dispatch", dispatch, "--dtype", a.dtype],
                         cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"case": case, "tree": tree,
                                                "steps_per_dispatch": dispatch,
                                                "error": out.stderr[-3000:]}


if __name__ == "__main__":
    main()
