"""Images/s of fracture_jax's train step (full fine-tune, frozen backbone) and inference.

Prints one JSON line per (model, mode): median images/s over timed steps, compile time and
peak resident memory. Random weights and synthetic batches, like the peer scripts. With
``--peers torch,keras`` the peer scripts of ``--peers-dir`` run next, in the same invocation,
their JSON lines are passed through, and a last ``summary`` line gives each ratio
fracture_jax / best peer. With ``--baseline DIR`` (another checkout of fracture_jax, e.g. a
``git worktree`` of an older commit) its own ``train_speed.py`` runs each model right after
this one's, and the summary gives this tree's images/s over the baseline's.

    python benchmarks/train_speed.py [--models efficientnetb2,resnet50,vgg16] [--modes full,frozen,infer]
        [--peers torch,keras --peers-dir ../shared/bench/peers --peers-env ~/.cache/fracture_peers]
        [--baseline /tmp/fracture_jax_old [--baseline-python /tmp/old_venv/bin/python]]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fracture_jax.kernels.host_memory import ours, restart_with_tunables, without_tunables  # noqa: E402

if __name__ == "__main__":
    restart_with_tunables()  # as main.py does

import jax  # noqa: E402
import jax.extend  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from fracture_jax import parallel  # noqa: E402
from fracture_jax.kernels import portable  # noqa: E402
from fracture_jax.models.builder import frozen_layers, initial_variables  # noqa: E402
from fracture_jax.train import Phase, TrainState, compile_phase  # noqa: E402


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def model_flops(jaxpr) -> float:
    """FLOPs of the convolutions and matrix products in ``jaxpr`` (2 per multiply-add), the
    count model FLOP utilisation is quoted in; the same on every backend."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":  # each output sums over one kernel window
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            window = np.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(out) * window
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        total += sum(model_flops(sub) for sub in _sub_jaxprs(eqn))
    return total


def step_flops(config, phase, mesh, mode, state, data, key) -> float:
    """Model FLOPs of one step, traced from a fresh program with XLA's own convolutions (so the
    CPU depthwise path counts like the GPU's); nothing is compiled."""
    with portable():
        program = compile_phase(config, phase, False, 100, mesh)
        if mode == "infer":
            traced = jax.make_jaxpr(program.forward)(state.variables, data["image"])
        else:
            traced = jax.make_jaxpr(program.train_step)(state, data, key)
    return model_flops(traced.jaxpr)


def bench(name, mode, size, batch, steps, dtype):
    config = default.get_config()
    config.model.name, config.model.image_size, config.model.dtype = name, size, dtype
    config.train.batch_size = batch
    mesh = parallel.make_mesh()
    variables, _ = initial_variables(config, jax.random.key(0))
    phase = Phase(0, 0, frozen_layers(name, "all" if mode == "frozen" else "none"), 1.0)
    program = compile_phase(config, phase, False, 100, mesh)
    state = parallel.replicate(TrainState.create(variables["params"],
                                                 variables.get("batch_stats", {}),
                                                 program.init_opt_state(variables["params"])),
                               mesh)
    rng = np.random.default_rng(0)
    host = {"image": rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 2, batch).astype(np.int32)}
    data = parallel.shard_batch(host, mesh)
    key = jax.random.key(0)
    if mode == "infer":
        def run(state):
            jax.block_until_ready(program.forward(state.variables, data["image"]))
            return state
    else:
        def run(state):
            state, loss, _ = program.train_step(state, data, key)
            jax.block_until_ready(loss)
            return state
    t = time.perf_counter()
    state = run(state)
    compile_s = time.perf_counter() - t
    flops = step_flops(config, phase, mesh, mode, state, data, key)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state = run(state)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"framework": "fracture_jax", "model": name, "mode": mode, "image_size": size,
            "batch": batch, "dtype": dtype, "img_per_s_median": batch / med,
            "step_s_median": med, "step_s": [round(t, 3) for t in times],
            "compile_s": compile_s, "steps": steps,
            "step_gflop": flops / 1e9 if flops else None,
            "achieved_tflop_s": flops / med / 1e12 if flops else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "matmul_precision": jax.config.jax_default_matmul_precision or "default",
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


PEER_NAMES = {"torch": {"efficientnetb2": "efficientnet_b2"}, "keras": {}}
PEER_MODES = {"full": "train", "frozen": "frozen", "infer": "infer"}


def run_peer(peer: str, models: list[str], modes: list[str], a) -> list[dict]:
    """Run one peer's script on the same models and modes; return its JSON records."""
    env = dict(os.environ)
    if not a.peers_tunables:  # the peers as their users run them
        env["GLIBC_TUNABLES"] = without_tunables(env.get("GLIBC_TUNABLES"), ours())
    python = os.path.join(os.path.expanduser(a.peers_env), peer, "bin", "python")
    cmd = [python, os.path.join(a.peers_dir, f"{peer}_bench.py"),
           "--models", ",".join(PEER_NAMES[peer].get(m, m) for m in models),
           "--modes", ",".join(PEER_MODES[m] for m in modes), "--wait-quiet", "5"]
    if peer == "torch":
        cmd += ["--channels-last", "1"]
    else:
        env["KERAS_BACKEND"] = "tensorflow"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    records = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
            records.append(json.loads(line))
    if out.returncode:
        print(json.dumps({"framework": peer, "error": out.stderr[-2000:]}), flush=True)
    return records


def run_tree(tree: str, label: str, models: list[str], modes: list[str], a,
             python: str = sys.executable) -> list[dict]:
    """A checkout's own train_speed.py, run by ``python``, on the same models and modes, in a
    process of its own (its imports; and its memory freed after, for the next); its records
    labelled ``label``."""
    cmd = [python, "benchmarks/train_speed.py", "--models", ",".join(models),
           "--modes", ",".join(modes), "--size", str(a.size), "--batch", str(a.batch),
           "--vgg-train-batch", str(a.vgg_train_batch), "--steps", str(a.steps),
           "--dtype", a.dtype]
    env = {k: v for k, v in os.environ.items() if k != "FRACTURE_JAX_RESTARTED"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    records = [dict(json.loads(line), framework=label)
               for line in out.stdout.splitlines() if line.startswith("{")]
    for r in records:
        print(json.dumps(r), flush=True)
    if out.returncode:
        print(json.dumps({"framework": label, "error": out.stderr[-2000:]}), flush=True)
    return records


def summary(ours: list[dict], peers: list[dict]) -> dict:
    """Per model and mode: each framework's images/s (the median over rounds) and fracture_jax's
    over the best peer's."""
    back = {v: k for names in PEER_NAMES.values() for k, v in names.items()}
    modes = {v: k for k, v in PEER_MODES.items()}
    speeds = {}
    for r in ours + [p for p in peers if p.get("img_per_s_median")]:
        key = f"{back.get(r['model'], r['model'])}/{modes.get(r['mode'], r['mode'])}"
        speeds.setdefault(key, {}).setdefault(r["framework"], []).append(r["img_per_s_median"])
    rows = {}
    for key, by_framework in speeds.items():
        median = {f: round(statistics.median(v), 3) for f, v in by_framework.items()}
        best_peer = max((v for f, v in median.items() if f not in ("fracture_jax", "baseline")),
                        default=None)
        rows[key] = {**median, "ratio_to_best_peer": round(median["fracture_jax"] / best_peer, 3)
                     if best_peer else None}
        if "baseline" in median:
            rows[key]["ratio_to_baseline"] = round(median["fracture_jax"] / median["baseline"], 3)
    return {"summary": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="efficientnetb2,resnet50,vgg16")
    p.add_argument("--modes", default="full,frozen,infer")
    p.add_argument("--size", type=int, default=260)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vgg-train-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every measurement; the summary gives medians over rounds")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--peers", default="", help="comma-separated: torch, keras")
    p.add_argument("--peers-dir", default="../shared/bench/peers")
    p.add_argument("--peers-tunables", action="store_true",
                   help="run the peers with fracture_jax's glibc malloc tunables too")
    p.add_argument("--peers-env", default=os.environ.get("PEERS", "~/.cache/fracture_peers"))
    p.add_argument("--baseline", default="",
                   help="another fracture_jax checkout, timed right after this one per model")
    p.add_argument("--baseline-python", default="",
                   help="the baseline's interpreter (e.g. another virtual environment's, to "
                        "time a dependency upgrade); default: this one")
    a = p.parse_args()
    models, modes = a.models.split(","), a.modes.split(",")
    ours, peers = [], []
    root = str(Path(__file__).resolve().parents[1])
    for _ in range(a.rounds):
        for name in models:  # each model's frameworks back to back: the machine drifts
            if a.baseline:  # both trees in processes of their own: one holds its heap till exit
                ours += run_tree(root, "fracture_jax", [name], modes, a)
                peers += run_tree(a.baseline, "baseline", [name], modes, a,
                                  a.baseline_python or sys.executable)
            else:
                for mode in modes:
                    batch = a.vgg_train_batch if name == "vgg16" and mode != "infer" else a.batch
                    ours.append(bench(name, mode, a.size, batch, a.steps, a.dtype))
                    print(json.dumps(ours[-1]), flush=True)
            for peer in filter(None, a.peers.split(",")):
                peers += run_peer(peer, [name], modes, a)
    if peers:
        print(json.dumps(summary(ours, peers)), flush=True)


if __name__ == "__main__":
    main()
