"""What ``main.py`` runs for each mode, after logging the devices and checking the config."""

import jax
from absl import logging

from fracture_jax import kernels
from fracture_jax.errors import UserError
from fracture_jax.models import get_spec


def log_devices():
    logging.info("JAX %s, backend %s, process %d of %d, %d local / %d global devices: %s",
                 jax.__version__, jax.default_backend(), jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(),
                 ", ".join(sorted({d.device_kind for d in jax.devices()})))
    logging.info("kernels: %s", ", ".join(f"{k} {v}" for k, v in kernels.describe().items()))


def run(config, workdir: str, mode: str, images: str | None = None):
    quiet_libraries()
    log_devices()
    get_spec(config.model.name)  # an unknown model name fails here, before any work
    if mode == "train":
        from fracture_jax.train import train_and_evaluate
        train_and_evaluate(config, workdir)
        if config.eval.after_train:
            from fracture_jax.evaluate import evaluate
            evaluate(config, workdir)
    elif mode == "eval":
        from fracture_jax.evaluate import evaluate
        evaluate(config, workdir)
    elif mode == "predict":
        from fracture_jax.predict import predict_files
        predict_files(config, workdir, images)
    elif mode == "export":
        from fracture_jax.export import export_run
        export_run(config, workdir)
    elif mode == "inspect":
        from fracture_jax.data.inspect import inspect_dataset
        inspect_dataset(config, workdir)
    else:
        raise UserError(f"--mode={mode} is unknown; use train, eval, predict, export or inspect")


class _QuietLibraries:
    """A logging filter that keeps the INFO chatter of checkpoint and dataset libraries out."""

    NOISY = ("orbax", "tensorflow_datasets", "grain", "etils")

    def filter(self, record) -> bool:
        return record.levelno > 20 or not any(n in record.pathname for n in self.NOISY)


def quiet_libraries():
    import logging as std_logging
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
