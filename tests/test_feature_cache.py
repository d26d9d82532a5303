"""Training the head on cached backbone features: when it applies, and that it trains the
same model as running the frozen backbone in every step."""

import json
import logging

import jax
import numpy as np
import pytest
from test_train import NO_AUGMENTATION, tiny_config

from fracture_jax.errors import UserError
from fracture_jax.feature_cache import applies
from fracture_jax.train import train_and_evaluate



def test_when_features_are_cached():
    plain = tiny_config(**NO_AUGMENTATION)
    assert applies(plain, backbone_frozen=True)
    assert not applies(plain, backbone_frozen=False)  # a trainable backbone layer
    assert not applies(tiny_config(), True)  # augmentation on
    assert not applies(tiny_config(**{**NO_AUGMENTATION, "data.augment.flip": True}), True)
    assert not applies(tiny_config(**NO_AUGMENTATION, **{"train.cache_features": "off"}), True)
    effnet = tiny_config(**NO_AUGMENTATION, **{"model.name": "efficientnetb2"})
    assert not applies(effnet, True)  # drop-connect is random even in a frozen backbone
    effnet.train.cache_features = "force"
    assert applies(effnet, True)
    effnet.train.cache_features = "sometimes"
    with pytest.raises(UserError, match="auto, force, off"):
        applies(effnet, True)


def _train(phantom_root, workdir, cache):
    config = tiny_config(**NO_AUGMENTATION, **{
        "data.root": str(phantom_root), "data.num_workers": 0, "train.epochs": 3,
        "model.image_size": 48,
        "train.patience": 5, "train.head_epochs": 2, "train.freeze": "none",
        "train.cache_features": cache, "model.dropout": 0.3, "optimizer.name": "adam",
        "optimizer.lr": 1e-2})
    state = train_and_evaluate(config, str(workdir))
    return json.loads((workdir / "history.json").read_text()), state


def test_cached_head_phase_trains_the_same_model(phantom_root, tmp_path, caplog):
    """Two head epochs on cached features then one unfrozen epoch on images, against the same
    recipe with the backbone run in every step: the same losses, metrics and weights up to
    float rounding (the head's dropout draws the same masks; the unfrozen phase continues the
    same image stream)."""
    caplog.set_level(logging.INFO, logger="absl")
    reference, ref_state = _train(phantom_root, tmp_path / "off", "off")
    assert "cached backbone features" not in caplog.text
    cached, state = _train(phantom_root, tmp_path / "auto", "auto")
    assert "phase 0 trains the head on cached backbone features" in caplog.text
    assert caplog.text.count("features of 24 train and") == 1  # computed once
    assert len(reference) == len(cached) == 3
    for a, b in zip(reference, cached):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    # Adam's normalised steps (lr 1e-2) carry last-bit differences into the weights: up to
    # 2e-5 seen on a weight of 0.035, against updates of 1e-2 per step.
    for x, y in zip(jax.tree.leaves((ref_state.params, ref_state.batch_stats)),
                    jax.tree.leaves((state.params, state.batch_stats))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5)
