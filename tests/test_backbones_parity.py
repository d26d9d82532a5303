"""Flax backbones vs keras.applications on real X-rays: relative error <= 1e-5 in float32."""

import jax
import numpy as np
import pytest
from conftest import images_at
from keras_reference import keras_features, keras_model, randomise, save_legacy_h5

from fracture_jax.models import backbone_layers
from fracture_jax.models.efficientnet import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB
from fracture_jax.weights import load_keras_backbone

CASES = [("efficientnetb2", 260), ("resnet50", 224), ("vgg16", 224), ("efficientnetb0", 224)]


def rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def ours(name, path, images):
    module, variables = load_keras_backbone(name, path, images.shape[1])
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images))


@pytest.mark.parametrize("name,size", CASES)
def test_notop_file_matches_keras(name, size, xray_batch, tmp_path):
    path = save_legacy_h5(randomise(keras_model(name, size), seed=1), tmp_path / "w.h5")
    reference = keras_model(name, size)
    reference.load_weights(path)  # Keras' own loader, as a user of the file would
    images = images_at(xray_batch, size)
    expected = keras_features(reference, name, images)
    got = ours(name, path, images)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("name,size", [("efficientnetb2", 260), ("resnet50", 224), ("vgg16", 224)])
def test_with_top_file_matches_keras(name, size, xray_batch, tmp_path):
    path = save_legacy_h5(randomise(keras_model(name, size, include_top=True), seed=2),
                          tmp_path / "top.h5")
    reference = keras_model(name, size, include_top=True)
    reference.load_weights(path)
    images = images_at(xray_batch[:2], size)
    expected = keras_features(reference, name, images, include_top=True)
    assert rel_err(ours(name, path, images), expected) <= 1e-5


def test_published_efficientnet_file_reproduces_keras_imagenet_path(xray_batch, tmp_path,
                                                                    monkeypatch):
    """A published-style file (std stored as the variance) loaded by Keras' own
    ``weights="imagenet"`` path, its download pointed at the local file."""
    from keras.src.applications import efficientnet
    published = randomise(keras_model("efficientnetb2", 260), seed=3,
                          normalization=(IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB))
    path = save_legacy_h5(published, tmp_path / "efficientnetb2_notop.h5")
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: path)
    reference = keras_model("efficientnetb2", 260, weights="imagenet")
    images = images_at(xray_batch, 260)
    expected = keras_features(reference, "efficientnetb2", images)
    module, _ = load_keras_backbone("efficientnetb2", path)
    assert module.imagenet_rescaling
    assert rel_err(ours("efficientnetb2", path, images), expected) <= 1e-5


@pytest.mark.parametrize("name", ["efficientnetb2", "resnet50", "vgg16"])
def test_layer_order_is_keras(name):
    """The layers ``frozen`` counts come in Keras' order, whatever order the fused epilogues
    call them in (a BatchNorm's affine is read before its convolution runs)."""
    import keras
    keras.backend.clear_session()  # Keras numbers unnamed layers per session: "normalization"
    expected = [layer.name for layer in keras_model(name, 64).layers if layer.weights]
    assert list(backbone_layers(name, 64)) == expected
