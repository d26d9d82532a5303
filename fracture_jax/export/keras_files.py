"""The fine-tuned model in the seed's formats: the keras.applications backbone with the seed's
head (global average pooling, dropout, one sigmoid unit), as a legacy-layout ``.h5`` weights
file (the inverse of ``weights.keras_h5``) and as a ``.keras`` model.

The ``.h5`` needs only h5py; the ``.keras`` file needs Keras (any backend).
"""

import math
import os

import h5py
import numpy as np

from fracture_jax.files import atomic_path
from fracture_jax.models import backbone_layers, get_spec
from fracture_jax.models.efficientnet import IMAGENET_STDDEV_RGB
from fracture_jax.weights.keras_h5 import KERAS_ORDER

HEAD = "fracture_logit"


def keras_layer_arrays(model: str, variables: dict
                       ) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """[(layer, [(variable, array)])] for every layer with weights, in the Keras model's order."""
    layers = []
    for name in backbone_layers(model):
        arrays = {**variables["params"]["backbone"].get(name, {}),
                  **variables.get("batch_stats", {}).get("backbone", {}).get(name, {})}
        arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        layers.append((name, sorted(arrays.items(), key=lambda kv: KERAS_ORDER.index(kv[0]))))
    head = variables["params"][HEAD]
    layers.append((HEAD, [("kernel", np.asarray(head["kernel"], np.float32)),
                          ("bias", np.asarray(head["bias"], np.float32))]))
    return layers


def write_legacy_h5(path: str, layers) -> str:
    """Keras' legacy HDF5 weights layout: root ``layer_names``, per layer ``weight_names``."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]
        f.attrs["backend"] = b"jax"
        f.attrs["keras_version"] = b"3"
        for name, arrays in layers:
            group = f.create_group(name)
            names = [f"{name}/{var}:0" for var, _ in arrays]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, (_, array) in zip(names, arrays):
                group.create_dataset(n, data=array)
    return path


def keras_model(model: str, image_size: int, dropout: float, imagenet_rescaling: bool = False):
    """The Keras architecture: keras.applications backbone (no top) + the seed's head.

    With ``imagenet_rescaling`` (a run from the published EfficientNet file, which stores the
    std where the variance belongs) the backbone is Keras' ``weights="imagenet"`` one: a
    ``1/sqrt(std)`` rescaling after its Normalization layer, as fracture_jax computes it.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    spec = get_spec(model)
    base = getattr(keras.applications, spec.keras_class)(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    if imagenet_rescaling:
        scale = [1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB]

        def rescale_after_normalization(layer, *args, **kwargs):
            out = layer(*args, **kwargs)
            if isinstance(layer, keras.layers.Normalization):
                out = keras.layers.Rescaling(scale, name="imagenet_std_rescaling")(out)
            return out

        base = keras.models.clone_model(base, call_function=rescale_after_normalization)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(base.output)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name=HEAD)(x)
    return keras.Model(base.input, out, name=f"fracture_{model}")


def write_keras(path: str, model: str, image_size: int, dropout: float, h5_path: str,
                imagenet_rescaling: bool = False) -> str:
    """Build the Keras model, load the ``.h5`` into it (as a Keras user would) and save it."""
    net = keras_model(model, image_size, dropout, imagenet_rescaling)
    net.load_weights(h5_path)
    with atomic_path(path) as tmp:  # keeps the .keras suffix Keras insists on
        net.save(tmp)
    return path
