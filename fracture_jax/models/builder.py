"""The one place a classifier is built: its module, its frozen layers and its first variables
(random, with the pretrained backbone merged in). Train, evaluate, predict, export and the
feature cache all build through here."""

import re

import flax
import jax
import jax.numpy as jnp
from absl import logging

from fracture_jax import parallel
from fracture_jax.errors import UserError
from fracture_jax.models.classifier import FractureClassifier, backbone_layers
from fracture_jax.models.registry import get_spec

INIT_SIZE = 32  # parameter shapes do not depend on the image size: initialise small


def frozen_layers(model: str, freeze) -> frozenset:
    """``train.freeze`` ('none', 'all' or a number of leading layers, in Keras' order) as the
    names of the frozen backbone layers."""
    layers = backbone_layers(get_spec(model).name)
    text = str(freeze).strip().lower()
    if text in ("none", "0", "false", ""):
        return frozenset()
    if text in ("all", "backbone", "true"):
        return frozenset(layers)
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"train.freeze={freeze!r}: use none, all, or a number of layers") from None
    return frozenset(layers[:max(0, n)])


_BLOCK = re.compile(r"^(conv\d+_block\d+|block\d+[a-z]?|conv\d+|stem|top)(_|$)")


def layer_groups(model: str) -> dict[str, tuple[str, ...]]:
    """The backbone's layers in Keras' order, grouped by block (EfficientNet's block2a, ResNet's
    conv3_block1, VGG's block3, the stem, the top): the units of layer-wise learning rates."""
    groups = {}
    for name in backbone_layers(get_spec(model).name):
        found = _BLOCK.match(name)
        groups.setdefault(found.group(1) if found else name, []).append(name)
    return {k: tuple(v) for k, v in groups.items()}


def group_rate_factors(model: str, decay: float) -> dict[str, float]:
    """Each block's learning-rate factor under layer-wise decay: the last ``decay``, the one
    before it ``decay**2``, ... the first ``decay**len(groups)`` (the head keeps 1)."""
    groups = list(layer_groups(model))
    return {group: decay ** (len(groups) - g) for g, group in enumerate(groups)}


def layer_rate_factors(model: str, decay: float) -> dict[str, float]:
    """``group_rate_factors`` for each backbone layer by name."""
    factors = group_rate_factors(model, decay)
    return {name: factors[group] for group, names in layer_groups(model).items()
            for name in names}


def classifier(config, frozen: frozenset = frozenset(), imagenet_rescaling: bool = False):
    """The data-parallel classifier of ``config.model`` with ``frozen`` layers."""
    return FractureClassifier(model=get_spec(config.model.name).name,
                              dropout_rate=config.model.dropout, frozen=frozenset(frozen),
                              imagenet_rescaling=imagenet_rescaling, axis_name=parallel.AXIS,
                              dtype=jnp.dtype(config.model.dtype))


def initial_variables(config, rng) -> tuple[dict, bool]:
    """(variables, imagenet_rescaling): random init, with the pretrained backbone merged in."""
    from fracture_jax.weights import backbone_variables, resolve_weights

    spec = get_spec(config.model.name)
    path = resolve_weights(spec.name, config.model.pretrained, config.model.weights_cache)
    module = FractureClassifier(model=spec.name, dropout_rate=config.model.dropout)
    variables = flax.core.unfreeze(
        jax.jit(module.init)(rng, jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3))))
    if path is None:
        logging.warning("=" * 70 + "\nmodel.pretrained is None: the backbone starts from RANDOM "
                        "weights, not ImageNet.\n" + "=" * 70)
        return variables, False
    loaded, rescaling = backbone_variables(spec.name, path, INIT_SIZE)
    for collection, tree in loaded.items():
        variables[collection]["backbone"] = tree["backbone"]
    logging.info("backbone weights from %s%s", path,
                 " (published layout: ImageNet std rescaling on)" if rescaling else "")
    return variables, rescaling
