"""What ``main.py`` runs for each mode, after logging the devices and checking the config."""

import jax
from absl import logging

from fracture_jax import interrupt, kernels, workdir_lock
from fracture_jax.errors import UserError
from fracture_jax.models import get_spec


def log_devices():
    local = jax.local_devices()
    logging.info("JAX %s, backend %s, process %d of %d: %d local devices (%s, ids %s) of %d",
                 jax.__version__, jax.default_backend(), jax.process_index(), jax.process_count(),
                 len(local), ", ".join(sorted({d.device_kind for d in local})),
                 ",".join(str(d.id) for d in local), jax.device_count())
    logging.info("kernels: %s", ", ".join(f"{k} {v}" for k, v in kernels.describe().items()))


def run(config, workdir: str, mode: str, images: str | None = None):
    """``mode`` on ``config`` and ``workdir``, with SIGINT and SIGTERM handled
    (``interrupt``)."""
    with interrupt.handled():
        _run(config, workdir, mode, images)


def _run(config, workdir: str, mode: str, images: str | None):
    if mode == "config":
        print(config)
        return
    quiet_libraries()
    log_devices()
    get_spec(config.model.name)  # an unknown model name fails here, before any work
    if mode == "train":
        from fracture_jax.train import train_and_evaluate
        with workdir_lock.held(workdir):
            train_and_evaluate(config, workdir)
            if config.eval.after_train:
                from fracture_jax.evaluate import CHANCE, evaluate
                chance = [w for w in evaluate(config, workdir)["warnings"] if CHANCE in w]
                if chance and not config.train.allow_chance:
                    raise UserError(f"the trained model is at chance level: {chance[0]}; the "
                                    f"report is in {workdir}/eval. Set "
                                    "--config.train.allow_chance=True to accept such a run")
    elif mode == "eval":
        from fracture_jax.evaluate import evaluate
        evaluate(config, workdir)
    elif mode == "cv":
        from fracture_jax.cross_validation import cross_validate
        with workdir_lock.held(workdir):
            cross_validate(config, workdir)
    elif mode == "predict":
        from fracture_jax.predict import predict_files
        predict_files(config, workdir, images)
    elif mode == "export":
        from fracture_jax.export import export_run
        if jax.process_index() == 0:  # files from one process (the others have nothing to do)
            export_run(config, workdir)
    elif mode == "lr_find":
        from fracture_jax.lr_find import lr_find
        lr_find(config, workdir)
    elif mode == "inspect":
        from fracture_jax.data.inspect import inspect_dataset
        inspect_dataset(config, workdir)
    else:
        raise UserError(f"--mode={mode} is unknown; use train, eval, cv, predict, export, "
                        "inspect, lr_find or config")


class _QuietLibraries:
    """A logging filter that keeps the INFO chatter of checkpoint and dataset libraries out."""

    NOISY = ("orbax", "tensorflow_datasets", "grain", "etils")

    def filter(self, record) -> bool:
        return record.levelno > 20 or not any(n in record.pathname for n in self.NOISY)


def quiet_libraries():
    import logging as std_logging
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
