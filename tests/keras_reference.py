"""Keras reference models (keras.applications on the JAX backend) and legacy .h5 fixtures."""

import h5py
import numpy as np

KERAS_CTORS = {"efficientnetb0": "EfficientNetB0", "efficientnetb2": "EfficientNetB2",
               "resnet50": "ResNet50", "vgg16": "VGG16"}
CAFFE = {"resnet50": "resnet50", "vgg16": "vgg16"}


def keras_model(name: str, size: int, include_top: bool = False, **kw):
    import keras
    ctor = getattr(keras.applications, KERAS_CTORS[name])
    if include_top:
        return ctor(weights=kw.pop("weights", None), include_top=True, **kw)
    return ctor(weights=kw.pop("weights", None), include_top=False, pooling="avg",
                input_shape=(size, size, 3), **kw)


def randomise(model, seed: int = 0, normalization=None, spread: float = 0.5):
    """Random BatchNorm statistics and affine terms (so their order matters; ``spread`` sets
    how far scales stray from 1), and optionally fixed Normalization ``(mean, variance)``."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            c, s = weights[0].shape, spread
            weights = [rng.uniform(1 - s, 1 + s, c), rng.normal(0, s / 5, c),
                       rng.normal(0, s / 5, c), rng.uniform(1 - s, 1 + s, c)]
        elif kind == "Normalization":
            mean, var = normalization or (rng.uniform(0.3, 0.6, 3), rng.uniform(0.04, 0.09, 3))
            weights = [np.asarray(mean).reshape(weights[0].shape),
                       np.asarray(var).reshape(weights[1].shape), weights[2]]
        layer.set_weights([np.asarray(w, v.dtype) for w, v in zip(weights, layer.get_weights())])
    return model


def save_legacy_h5(model, path) -> str:
    """The published files' layout: root ``layer_names``, per-layer ``weight_names``."""
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return str(path)


def keras_features(model, name: str, images: np.ndarray, include_top: bool = False):
    """Pooled backbone features of a Keras model for RGB 0-255 images, Keras' own way."""
    import keras
    x = images.copy()
    if name in CAFFE:
        x = getattr(keras.applications, CAFFE[name]).preprocess_input(x)
    if include_top:
        if name == "vgg16":
            pool = keras.Model(model.input, model.get_layer("block5_pool").output)
            return np.asarray(pool(x)).mean(axis=(1, 2))
        return np.asarray(keras.Model(model.input, model.get_layer("avg_pool").output)(x))
    return np.asarray(model(x))
