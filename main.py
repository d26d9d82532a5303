"""fracture_jax command line: train, evaluate, predict or inspect, from a config file.

    python main.py --config=configs/effnet.py --workdir=runs/effnet [--mode=train]
    python main.py --config=configs/demo.py --workdir=runs/demo --config.train.epochs=2

The logic lives in the ``fracture_jax`` package; this file parses flags and dispatches.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Path to a config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs and reports go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "inspect"], "What to do.")
flags.DEFINE_string("images", None, "predict: an image file, a folder or a glob.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from fracture_jax import cli
    from fracture_jax.errors import UserError

    try:
        cli.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, images=FLAGS.images)
    except UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # grain's worker processes start by importing this module
    app.run(main)
