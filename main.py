"""fracture_jax command line: train, evaluate, predict, export or inspect, from a config file.

    python main.py --config=configs/effnet.py --workdir=runs/effnet [--mode=train]
    python main.py --config=configs/demo.py --workdir=runs/demo --config.train.epochs=2

The logic lives in the ``fracture_jax`` package; this file parses flags and dispatches.
"""

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIGS = sorted(p.name for p in (Path(__file__).parent / "configs").glob("[!_]*.py"))
config_flags.DEFINE_config_file(
    "config", "configs/default.py",
    f"A config file: configs/{{{','.join(_CONFIGS)}}}. Every key, its default and its meaning "
    "are in configs/default.py; override any with --config.<key>=<value> (e.g. "
    "--config.optimizer.lr=3e-4); --mode=config prints the result.", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs and reports go.")
flags.DEFINE_enum("mode", "train",
                  ["train", "eval", "cv", "predict", "export", "inspect", "lr_find", "config"],
                  "train (then eval), eval (score the best checkpoint and write the report), "
                  "cv (K-fold cross-validation over train+val, data.folds), "
                  "predict (--images), export (.keras, .h5, .onnx), inspect (the data folder), "
                  "lr_find (the learning-rate range test), config (print the resolved config "
                  "and exit).")
flags.DEFINE_string("images", None, "predict: an image file, a folder or a glob.")
flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                  "auto: join a multi-process run that JAX detects (TPU slice, SLURM, Open MPI, "
                  "GKE); off: one process unless --coordinator is given.")
flags.DEFINE_string("coordinator", None, "A multi-process run: process 0's HOST:PORT, the same on "
                    "every process (default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "A multi-process run: how many processes "
                     "(default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "A multi-process run: this process's index, 0 to "
                     "num_processes-1 (default: $JAX_PROCESS_ID).")


def _inside_get_config(error: BaseException) -> bool:
    """Whether ``error`` was raised while a config file's ``get_config`` ran."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "get_config":
            return True
        tb = tb.tb_next
    return False


def parse_flags(argv):
    """absl's parsing, with a bad flag or config override (unknown key, wrong type) or a config
    file that cannot be read as one line. A bug inside a config file keeps its traceback."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.to_dict()  # a config file loads lazily: load it here, inside the try
        return rest
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        if _inside_get_config(e):
            raise  # a bug in the config file: its traceback says where
        message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()).strip("'")
        print(f"error: bad command line: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from fracture_jax import cli, distributed
    from fracture_jax.errors import UserError
    from fracture_jax.interrupt import Interrupted

    try:
        distributed.join(FLAGS.distributed, FLAGS.coordinator, FLAGS.num_processes,
                         FLAGS.process_id)
        cli.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, images=FLAGS.images)
    except UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # the checkpoint is written: leave without waiting on anything
        _leave(f"interrupted: {e}", e.code)
    except Exception as e:  # noqa: BLE001 (a peer's death surfaces as any runtime error)
        if not distributed.peer_failure(e):
            raise
        _leave(f"error: {distributed.peer_failure(e)}", 1)


def _leave(message: str, code: int):
    """Print ``message`` and exit at once, waiting on no thread, peer or loader."""
    logging.flush()
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":  # grain's worker processes start by importing this module
    from fracture_jax.kernels.host_memory import restart_with_tunables
    restart_with_tunables()
    app.run(main, flags_parser=parse_flags)
