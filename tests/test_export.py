"""Export: Flax -> Keras .h5/.keras -> Keras predictions, and Flax -> ONNX -> onnxruntime, on
real X-rays, for the three backbones with the seed's head; and --mode=export end to end."""

import csv
import importlib.util
import json

import jax
import jax.numpy as jnp
import keras
import numpy as np
import onnxruntime as ort
import pytest
from conftest import images_at
from keras_reference import keras_model, randomise, save_legacy_h5

from fracture_jax import cli
from fracture_jax.errors import UserError
from fracture_jax.export import write_onnx
from fracture_jax.export.keras_files import keras_layer_arrays, write_keras, write_legacy_h5
from fracture_jax.export.keras_files import keras_model as keras_head_model
from fracture_jax.models import FractureClassifier, get_spec
from fracture_jax.models.efficientnet import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB
from fracture_jax.weights import backbone_variables
from test_train import tiny_config


def fine_tuned(name: str, size: int, published: bool, images, tmp_path):
    """A model as fine-tuning leaves it, loaded through our loader: random weights, BatchNorm
    statistics that fit its activations, and a head whose probabilities on ``images`` spread
    around 0.5."""
    norm = (IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB) if published else None
    keras.utils.set_random_seed(4)
    backbone = randomise(keras_model(name, size), seed=4, normalization=norm)
    path = save_legacy_h5(backbone, tmp_path / "backbone.h5")
    loaded, rescaling = backbone_variables(name, path, size)
    assert rescaling == published
    features = FractureClassifier(model=name, include_head=False, imagenet_rescaling=rescaling)
    feats = np.asarray(features.apply(loaded, images), np.float64)
    w = np.random.default_rng(0).normal(size=(feats.shape[1], 1))
    # like a trained head, respond to how images differ, not to what all features share
    common = feats.mean(axis=0, keepdims=True).T / np.linalg.norm(feats.mean(axis=0))
    w -= common @ (common.T @ w)
    z = feats @ w
    scale = 1.5 / z.std()
    head = {"kernel": jnp.asarray(w * scale, jnp.float32),
            "bias": jnp.asarray([-(z * scale).mean()], jnp.float32)}
    variables = {"params": {"backbone": loaded["params"]["backbone"], "fracture_logit": head},
                 "batch_stats": loaded.get("batch_stats", {})}
    model = FractureClassifier(model=name, dropout_rate=0.2, imagenet_rescaling=rescaling)
    return model, variables, rescaling


def float32_noise(model, variables, images, probs) -> float:
    """How far fracture_jax's own float32 probabilities move under rounding alone: eager vs
    compiled, and inputs changed in their last bit. These random-weight networks amplify
    rounding to 4e-6 to 1e-5 on the probability; another implementation of the same float32
    arithmetic (Keras, onnxruntime) differs by a few times that, a wrong export by 1e-2 or more."""
    moves = [np.abs(np.asarray(jax.nn.sigmoid(model.apply(variables, images))) - probs).max()]
    rng = np.random.default_rng(0)
    for _ in range(5):
        nudged = images * (1 + rng.normal(0, 6e-8, images.shape)).astype(np.float32)
        moves.append(np.abs(np.asarray(jax.nn.sigmoid(jax.jit(model.apply)(variables, nudged)))
                            - probs).max())
    return float(max(moves))


@pytest.mark.parametrize("name,size,published", [("efficientnetb2", 260, True),
                                                 ("resnet50", 224, False),
                                                 ("vgg16", 224, False)])
def test_keras_and_onnx_files_predict_what_fracture_jax_predicts(name, size, published,
                                                                  xray_batch, tmp_path):
    images = images_at(xray_batch, size)
    model, variables, rescaling = fine_tuned(name, size, published, images, tmp_path)
    ours = np.asarray(jax.nn.sigmoid(jax.jit(model.apply)(variables, images)))
    assert ours.max() - ours.min() > 0.3  # not saturated: the comparison means something
    tol = max(1e-5, 8 * float32_noise(model, variables, images, ours))

    h5 = write_legacy_h5(str(tmp_path / "model.h5"),
                         keras_layer_arrays(name, variables))
    spec = get_spec(name)
    keras_in = images.copy()
    if spec.keras_preprocess:
        keras_in = getattr(keras.applications, spec.keras_preprocess).preprocess_input(keras_in)
    net = keras_head_model(name, size, 0.2, rescaling)  # the .h5 into a fresh Keras model
    net.load_weights(h5)
    # the backbone, as the parity tests hold it: pooled features within 1e-5 relative
    pooled = keras.Model(net.input, net.get_layer("head_pool").output)(keras_in)
    features = FractureClassifier(model=name, include_head=False, imagenet_rescaling=rescaling)
    ours_pooled = np.asarray(features.apply(variables, images))
    pooled_err = np.linalg.norm(np.asarray(pooled) - ours_pooled) / np.linalg.norm(ours_pooled)
    assert pooled_err <= 1e-5
    np.testing.assert_allclose(np.asarray(net(keras_in))[:, 0], ours, atol=tol)

    path = write_keras(str(tmp_path / "model.keras"), name, size, 0.2, h5, rescaling)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(keras_in, verbose=0)[:, 0], ours, atol=tol)

    onnx_path = write_onnx(str(tmp_path / "model.onnx"), model, variables, size)
    session = ort.InferenceSession(onnx_path)
    served = np.concatenate([session.run(None, {"image": images[i:i + 1]})[0]
                             for i in range(len(images))])
    np.testing.assert_allclose(served, ours, atol=tol)
    print(f"{name}: max |difference| keras {np.abs(np.asarray(net(keras_in))[:, 0] - ours).max():.2e}"
          f", onnx {np.abs(served - ours).max():.2e}; float32 noise bound {tol:.2e}; keras pooled "
          f"features relative error {pooled_err:.1e}")


def test_export_mode_end_to_end(phantom_root, tmp_path):
    """Train a tiny VGG16 run, export it and check each file against --mode=predict, within
    the same float32 rounding bound as above (a trained run's weights are another draw)."""
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "model.name": "vgg16", "train.epochs": 1, "eval.bootstrap": 20,
                            "optimizer.name": "adam", "optimizer.lr": 1e-4,
                            "model.dropout": 0.3})
    work = tmp_path / "run"
    cli.run(config, str(work), "train")
    cli.run(config, str(work), "export")
    out = work / "export"
    info = json.loads((out / "model.json").read_text())
    threshold = json.loads((work / "eval" / "threshold.json").read_text())
    assert info["threshold"]["value"] == threshold["value"]
    assert info["threshold"]["chosen_on"] == "val"
    assert info["model"] == "vgg16" and info["input_size"] == 32
    assert info["class_names"] == ["not_fractured", "fractured"]
    assert info["training_data"]["counts"]["train"] == {"not_fractured": 12, "fractured": 12}
    assert not list(out.glob("*.tmp*"))

    config.predict.output = str(tmp_path / "p.csv")
    cli.run(config, str(work), "predict", images=str(phantom_root / "test"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    from fracture_jax.predict import load_image
    x = np.stack([load_image(r["file"], 32) for r in rows])
    expected = np.array([float(r["probability"]) for r in rows])
    from fracture_jax.evaluate import load_member
    member = load_member(str(work))
    tol = max(1e-5, 8 * float32_noise(member.model, member.variables, x, expected))
    keras_p = keras.models.load_model(out / "model.keras").predict(
        keras.applications.vgg16.preprocess_input(x.copy()), verbose=0)[:, 0]
    np.testing.assert_allclose(keras_p, expected, atol=tol)
    session = ort.InferenceSession(str(out / "model.onnx"))
    onnx_p = [session.run(None, {"image": x[i:i + 1]})[0][0] for i in range(len(x))]
    np.testing.assert_allclose(onnx_p, expected, atol=tol)
    print(f"end to end: keras {np.abs(keras_p - expected).max():.1e}, onnx "
          f"{np.abs(np.asarray(onnx_p) - expected).max():.1e}; float32 noise bound {tol:.1e}")


def test_export_errors_name_the_fix(phantom_root, tmp_path, monkeypatch):
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 1, "eval.bootstrap": 10})
    work = tmp_path / "small"
    cli.run(config, str(work), "train")
    with pytest.raises(UserError, match="formats=onnx"):  # smallcnn is not a Keras model
        cli.run(config, str(work), "export")
    config.export.formats = "onnx,tflite"
    with pytest.raises(UserError, match="unknown tflite"):
        cli.run(config, str(work), "export")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "onnx" else real(n, *a))
    config.export.formats = "onnx"
    with pytest.raises(UserError, match="pip install onnx"):
        cli.run(config, str(work), "export")
    assert not (work / "export" / "model.onnx").exists()
