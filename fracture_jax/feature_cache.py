"""Training the head on cached backbone features.

When the whole backbone is frozen and the train images are not augmented, the backbone maps
each image to the same pooled features in every epoch. They are then computed once, for the
train and val splits, and the phase's steps and val passes run the head alone on them: the
same batches in the same order, the same dropout, the same numbers up to float rounding.
"""

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from fracture_jax.augment import Augment
from fracture_jax.mixing import Mixing
from fracture_jax.data.pipeline import cached_eval_batches, cached_train_dataset
from fracture_jax.errors import UserError
from fracture_jax.inference import make_forward, mesh_multiple, predict, predict_batches
from fracture_jax.models import get_spec

MODES = ("auto", "force", "off")


def applies(config, backbone_frozen: bool) -> bool:
    """Whether a phase trains on cached features (``backbone_frozen``: the whole backbone is),
    by ``config.train.cache_features``:

    - auto: when that changes nothing: the backbone wholly frozen, augmentation and mixing
      off, no random
      layer in the backbone, one process;
    - force: also when the frozen backbone has random layers (EfficientNet's drop-connect):
      the cache holds their inference-mode output, as Keras' ``base_model(x, training=False)``;
    - off: never.
    """
    mode = str(config.train.cache_features).lower()
    if mode not in MODES:
        raise UserError(f"train.cache_features={config.train.cache_features!r}: use one of "
                        f"{', '.join(MODES)}")
    augmented = (Augment.from_config(config.data.augment).active
                 or Mixing.from_config(config.data).active)
    if mode == "off" or not backbone_frozen or augmented or jax.process_count() > 1:
        return False
    if mode == "auto" and get_spec(config.model.name).drops_paths:
        logging.info("backbone features not cached: %s drops paths at random in training even "
                     "when frozen; train.cache_features=force caches its inference-mode "
                     "features", config.model.name)
        return False
    return True


@dataclasses.dataclass
class FeatureCache:
    """Pooled backbone features (N, C) and labels (N,) of the train and val splits, in the
    sources' order."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]

    @classmethod
    def compute(cls, model, variables, sources, config, mesh) -> "FeatureCache":
        """Run ``model``'s backbone (in inference mode) once over the train and val splits."""
        start = time.perf_counter()
        forward = make_forward(model.clone(include_head=False), mesh, config.model.image_size)
        splits = {split: predict(forward, variables, sources[split], config.train.batch_size,
                                 mesh, config.data.num_workers, config.data.prefetch)
                  for split in ("train", "val")}
        logging.info("backbone features of %d train and %d val images cached in %.1f s",
                     len(splits["train"][1]), len(splits["val"][1]), time.perf_counter() - start)
        return cls(**splits)

    def train_dataset(self, batch_size: int, seed: int, skip_batches: int,
                      balanced: bool = False):
        """The train stream ``train_dataset`` would give without augmentation, on features."""
        return cached_train_dataset(*self.train, batch_size, seed, skip_batches, balanced)

    def val_logits(self, head_forward, variables, batch_size: int, mesh):
        """(logits, labels) of the val split from its cached features."""
        batches = cached_eval_batches(*self.val, mesh_multiple(batch_size, mesh))
        return predict_batches(head_forward, variables, batches, mesh)
