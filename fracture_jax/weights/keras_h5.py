"""Read Keras' legacy HDF5 weight files and map them onto the Flax backbones by layer name.

The legacy layout (the published keras.applications files, and what
``legacy_h5_format.save_weights_to_hdf5_group`` writes) has a root attribute ``layer_names``
and one group per layer whose attribute ``weight_names`` lists its arrays in Keras' order.
Dataset names differ between Keras eras, so arrays are matched by position within their
layer, as Keras itself does, and every shape is checked against the Flax module's own.
"""

import math
import os
import re

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from fracture_jax.errors import UserError
from fracture_jax.models import FractureClassifier, get_spec
from fracture_jax.models.efficientnet import IMAGENET_STDDEV_RGB

# The order in which Keras lists a layer's arrays (JAX sorts dict keys, so order is explicit).
KERAS_ORDER = ("kernel", "depthwise_kernel", "bias", "gamma", "beta", "moving_mean",
               "moving_variance", "mean", "variance", "count")
# Keras names its Normalization layer automatically ("normalization", "normalization_3"...).
_AUTO_NAMES = {re.compile(r"normalization(_\d+)?$"): "normalization"}


class WeightsError(UserError, ValueError):
    """A weights file that cannot be loaded into the model; the message lists every problem."""


def _decode(names) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def read_layers(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Each layer with weights in a legacy Keras HDF5 file -> its arrays in Keras' order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weights file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(
            f"{path}: not a readable HDF5 file ({e}); a truncated download? Delete it and "
            "fetch it again, or point model.pretrained at a Keras .h5 weights file") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f  # full-model .h5 saves
        if "layer_names" not in root.attrs:
            raise WeightsError(
                f"{path}: no 'layer_names' attribute, so not a legacy Keras weights file "
                "(Keras 3 `.weights.h5` files use another layout: save with "
                "`model.save_weights('x.h5')` in Keras 2 or "
                "`legacy_h5_format.save_weights_to_hdf5_group`)")
        layers = {}
        for name in _decode(root.attrs["layer_names"]):
            group = root[name]
            names = _decode(group.attrs.get("weight_names", []))
            missing = [n for n in names if n not in group]
            if missing:
                raise WeightsError(f"{path}: layer {name} lists arrays the file lacks: "
                                   f"{', '.join(missing)} (a damaged file?)")
            if names:
                layers[name] = [np.asarray(group[n]) for n in names]
        return layers


def _canonical(name: str) -> str:
    for pattern, canonical in _AUTO_NAMES.items():
        if pattern.match(name):
            return canonical
    return name


def _expected_slots(shapes) -> dict[str, list[tuple[str, str, jax.ShapeDtypeStruct]]]:
    """Layer -> [(collection, variable, shape)] in Keras' order: trainable, then the rest."""
    slots: dict[str, list] = {}
    for collection in ("params", "batch_stats"):
        for layer, variables in shapes.get(collection, {}).get("backbone", {}).items():
            for var, sds in variables.items():
                slots.setdefault(layer, []).append((collection, var, sds))
    return {layer: sorted(s, key=lambda slot: KERAS_ORDER.index(slot[1]))
            for layer, s in slots.items()}


def _fits(array: np.ndarray, sds) -> bool:
    return array.shape == sds.shape or (
        array.size == math.prod(sds.shape) and np.squeeze(array).shape == tuple(
            d for d in sds.shape if d != 1))


def backbone_variables(model: str, path: str | os.PathLike, image_size: int | None = None):
    """The backbone variables stored in ``path`` for ``model``, checked array by array.

    Returns ``(variables, imagenet_rescaling)``: a ``{'params': {'backbone': ...},
    'batch_stats': {'backbone': ...}}`` tree and whether the file stores EfficientNet's
    normalisation the published way (std where the variance belongs), in which case Keras'
    ``weights="imagenet"`` model rescales by ``1/sqrt(std)`` and so must ours.
    """
    spec = get_spec(model)
    size = image_size or spec.default_size
    module = FractureClassifier(model=spec.name, include_head=False)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    slots = _expected_slots(shapes)
    layers = read_layers(path)

    out = {"params": {"backbone": {}}, "batch_stats": {"backbone": {}}}
    problems, unexpected, seen = [], [], set()
    for file_name, arrays in layers.items():
        name = _canonical(file_name)
        if name not in slots:
            if file_name not in spec.top_layers:
                unexpected.append(file_name)
            continue
        seen.add(name)
        want = slots[name]
        if len(arrays) != len(want):
            problems.append(f"  {file_name}: {len(arrays)} arrays in the file, the model has "
                            f"{len(want)} ({', '.join(v for _, v, _ in want)})")
            continue
        for array, (collection, var, sds) in zip(arrays, want):
            if not _fits(array, sds):
                problems.append(f"  {file_name}/{var}: shape {array.shape} in the file, "
                                f"the model expects {sds.shape}")
                continue
            out[collection]["backbone"].setdefault(name, {})[var] = jnp.asarray(
                array.reshape(sds.shape), sds.dtype)
    missing = [name for name in slots if name not in seen]
    if missing or unexpected or problems:
        msg = [f"{path} does not fit {spec.name}:"]
        if missing and len(missing) > len(slots) // 2:
            msg.append(f"  most of the model's layers are absent ({len(missing)} of {len(slots)}):"
                       f" is this a file for another model? Its layers start with "
                       f"{', '.join(list(layers)[:4])}")
        if missing:
            msg.append(f"  missing from the file ({len(missing)}): {', '.join(missing[:20])}"
                       + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            msg.append(f"  unexpected in the file ({len(unexpected)}): "
                       f"{', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        msg.extend(problems)
        raise WeightsError("\n".join(msg))

    rescaling = False
    norm = out["batch_stats"]["backbone"].get("normalization")
    if norm is not None:
        rescaling = bool(np.allclose(norm["variance"], IMAGENET_STDDEV_RGB, rtol=0, atol=1e-6))
    if not out["batch_stats"]["backbone"]:
        out.pop("batch_stats")
    return out, rescaling


def load_keras_backbone(model: str, path: str | os.PathLike, image_size: int | None = None):
    """A Keras weights file as ``(module, variables)``; ``module.apply(variables, images,
    train=False)`` maps RGB 0-255 images (N, H, W, 3) to pooled features (N, C)."""
    variables, rescaling = backbone_variables(model, path, image_size)
    module = FractureClassifier(model=get_spec(model).name, include_head=False,
                                imagenet_rescaling=rescaling)
    return module, variables
