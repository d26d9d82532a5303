"""The fine-tuning tools, each against a direct computation: gradient accumulation equals the
large batch, layer-wise rates equal the configured ratios, MixUp/CutMix mix images and targets
by the same weight, balanced sampling gives equal class counts, the learning-rate range test
suggests a rate of its sweep."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fracture_jax import parallel
from fracture_jax.checkpoint import load_best
from fracture_jax.data.pipeline import train_dataset
from fracture_jax.errors import UserError
from fracture_jax.lr_find import lr_find, suggestion
from fracture_jax.mixing import Mixing, mix_batch
from fracture_jax.models.builder import frozen_layers, initial_variables
from fracture_jax.train import (Phase, TrainState, compile_phase, make_optimizer, split_params,
                                train_and_evaluate)
from test_train import NO_AUGMENTATION, _batches, run_steps, tiny_config


def _joined(a, b):
    return {k: np.concatenate([a[k], b[k]]) for k in a}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulated_small_batches_equal_the_large_batch(optimizer):
    """BatchNorm frozen (the backbone wholly frozen, the head trained): two accumulated
    batches of 8 make the update one batch of 16 makes, step after step."""
    small = _batches(4, batch=8, seed=3)
    large = [_joined(small[0], small[1]), _joined(small[2], small[3])]
    frozen = frozen_layers("smallcnn", "all")
    common = {**NO_AUGMENTATION, "optimizer.name": optimizer, "optimizer.lr": 0.05,
              "train.cache_features": "off"}  # the images themselves through the step
    _, accumulated = run_steps(tiny_config(**common, **{"train.accumulate_steps": 2}),
                               jax.devices()[:2], frozen, small, steps=4)
    _, at_once = run_steps(tiny_config(**common, **{"train.batch_size": 16}),
                           jax.devices()[:2], frozen, large, steps=2)
    initial, _ = run_steps(tiny_config(**common), jax.devices()[:1], frozen, small, steps=0)
    moved = False
    for a, b, c in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(at_once.params),
                       jax.tree.leaves(initial["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        moved |= not np.allclose(a, c)
    assert moved  # (the head did train)


def test_accumulation_steps_must_be_a_whole_number():
    with pytest.raises(UserError, match="accumulate_steps"):
        make_optimizer(tiny_config(**{"train.accumulate_steps": 0}), 0.1)


def test_layer_wise_rates_equal_the_configured_ratios():
    """Plain SGD, a gradient of ones: each layer's update is -lr times its factor: the head 1,
    VGG-style blockN of the small CNN's four blocks decay**(5 - N); frozen layers excluded."""
    config = tiny_config(**{"optimizer.momentum": 0.0, "optimizer.lr": 0.1,
                            "optimizer.layer_decay": 0.5})
    variables, _ = initial_variables(config, jax.random.key(0))
    trainable, _ = split_params(variables["params"], frozenset({"block1_conv1", "block1_bn1"}))
    tx = make_optimizer(config, 0.1)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)
    seen = set()
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        keys = [k.key for k in path]
        factor = 0.5 ** (5 - int(keys[1][5])) if keys[0] == "backbone" else 1.0
        np.testing.assert_allclose(np.asarray(u), -0.1 * factor, rtol=1e-6)
        seen.add(keys[1] if keys[0] == "backbone" else keys[0])
    assert "block1_conv1" not in seen and {"block1_conv2", "block4_bn2", "fracture_logit"} <= seen


def _images(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(0, 255, (n, size, size, 3)), jnp.float32),
            jnp.asarray([1, 0, 0, 1, 1, 0], jnp.int32)[:n])


@pytest.mark.parametrize("seed", range(4))
def test_mixup_blends_images_and_targets_by_one_weight(seed):
    x, y = _images()
    mixed, targets, lam = mix_batch(x, y, jax.random.key(seed), Mixing(mixup_alpha=0.4))
    lam = float(lam)
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-6)
    again = mix_batch(x, y, jax.random.key(seed), Mixing(mixup_alpha=0.4))
    np.testing.assert_array_equal(again[0], mixed)  # deterministic from the key


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_a_box_whose_share_is_the_target_weight(seed):
    x, y = _images()
    mixed, targets, lam = mix_batch(x, y, jax.random.key(seed), Mixing(cutmix_alpha=1.0))
    from_partner = np.all(np.asarray(mixed) == np.asarray(x[::-1]), axis=-1)
    from_self = np.all(np.asarray(mixed) == np.asarray(x), axis=-1)
    assert np.all(from_partner | from_self)
    box = from_partner[0] & ~from_self[0]
    share = box.mean()
    assert np.all(from_partner[:, box])  # one box, the same in every image
    rows, cols = np.nonzero(box)
    if len(rows):
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
    np.testing.assert_allclose(float(lam), 1 - share, atol=1e-6)
    np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-6)


def test_mixing_off_or_unlucky_changes_nothing():
    x, y = _images()
    for mixing in (Mixing(mixup_alpha=0.4, prob=0.0), Mixing()):
        mixed, targets, lam = mix_batch(x, y, jax.random.key(0), mixing)
        np.testing.assert_array_equal(mixed, x)
        np.testing.assert_array_equal(targets, y.astype(np.float32))
        assert float(lam) == 1.0


def test_a_train_step_with_mixup_and_cutmix_trains():
    config = tiny_config(**NO_AUGMENTATION, **{"data.mixup_alpha": 0.4, "data.cutmix_alpha": 1.0})
    initial, state = run_steps(config, jax.devices()[:2], frozenset(), _batches(3))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial["params"]),
                                                      jax.tree.leaves(state.params)))


class _Labelled:
    """A minimal decoded source: 20 not-fractured images and 4 fractured ones."""

    labels = np.array([0] * 20 + [1] * 4)

    def __len__(self):
        return len(self.labels)

    def take(self, indices):
        images = np.broadcast_to(np.asarray(indices, np.uint8)[:, None, None, None],
                                 (len(indices), 4, 4, 3))
        return {"image": images, "label": self.labels[indices]}


def test_balanced_sampling_gives_every_batch_equal_class_counts():
    """Over 60 seeded batches from a 5:1 train split: 4 and 4 in each, every example drawn;
    the stream resumes from its saved state."""
    it = iter(train_dataset(_Labelled(), 8, seed=5, balanced=True))
    batches = [next(it) for _ in range(60)]
    for b in batches:
        assert (b["label"] == 1).sum() == 4 and (b["label"] == 0).sum() == 4
    drawn = {int(v) for b in batches for v in b["image"][:, 0, 0, 0]}
    assert drawn == set(range(24))
    again = iter(train_dataset(_Labelled(), 8, seed=5, balanced=True))
    for _ in range(10):
        next(again)
    state = again.get_state()
    expected = [next(again)["image"] for _ in range(3)]
    resumed = iter(train_dataset(_Labelled(), 8, seed=5, balanced=True))
    resumed.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["image"], e)
    np.testing.assert_array_equal(batches[10]["image"], expected[0])


def test_the_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = np.logspace(-6, 0, 13)
    smoothed = np.array([1.0, 1.0, 0.99, 0.95, 0.8, 0.5, 0.4, 0.35, 0.33, 0.34, 0.6, 2.0, 9.0])
    slope = np.gradient(smoothed[:9], np.log(lrs[:9]))
    assert suggestion(lrs, smoothed) == lrs[1 + int(np.argmin(slope[1:]))] == lrs[4]  # -0.45 / 2


def test_lr_range_test_suggests_a_rate_inside_its_sweep(phantom_root, tmp_path):
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "lr_find.steps": 24, "lr_find.min_lr": 1e-5, "lr_find.max_lr": 10.0})
    result = lr_find(config, str(tmp_path))
    lrs = np.asarray(result["lr"])
    assert 3 <= len(lrs) <= 24 and lrs[0] == pytest.approx(1e-5)
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(1e6) / 23, rtol=1e-6)
    assert result["suggested_lr"] in result["lr"]
    assert (tmp_path / "lr_find" / "lr_find.png").stat().st_size > 0
    assert json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())["suggested_lr"] == \
        result["suggested_lr"]
    assert not (tmp_path / "checkpoints").exists()


def test_ema_equals_the_formula_after_each_step():
    """ema_t = d_t ema_(t-1) + (1 - d_t) w_t with d_t = min(decay, (1 + t) / (10 + t)), over
    the parameters and the BatchNorm statistics, from ema_0 = w_0."""
    config = tiny_config(**NO_AUGMENTATION, **{"train.ema_decay": 0.8})
    mesh = parallel.make_mesh(jax.devices()[:2])
    variables, _ = initial_variables(config, jax.random.key(0))
    program = compile_phase(config, Phase(0, 0, frozenset(), 1.0), False, 10, mesh)
    state = parallel.replicate(TrainState.create(variables["params"], variables["batch_stats"],
                                                 program.init_opt_state(variables["params"]),
                                                 ema=True), mesh)
    expected = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    for t, batch in enumerate(_batches(4), start=1):
        state, _, _ = program.train_step(state, parallel.shard_batch(batch, mesh),
                                         jax.random.key(1))
        host = jax.device_get(state)
        d = min(0.8, (1 + t) / (10 + t))
        expected = jax.tree.map(lambda e, w: d * np.asarray(e) + (1 - d) * np.asarray(w),
                                expected, host.variables)
        for a, b in zip(jax.tree.leaves(host.ema), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(host.ema["params"]),
                                                      jax.tree.leaves(host.params)))


def test_with_ema_the_best_checkpoint_serves_the_ema_weights(phantom_root, tmp_path):
    """Validation scores the EMA; what eval, predict and export load is the best epoch's EMA,
    not its raw weights."""
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 2, "train.ema_decay": 0.9, "eval.after_train": False})
    train_and_evaluate(config, str(tmp_path))
    weights, _ = load_best(str(tmp_path))
    manager = ocp.CheckpointManager(tmp_path / "checkpoints" / "best")
    raw = manager.restore(manager.latest_step(),
                          args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
    manager.close()
    for a, b in zip(jax.tree.leaves(weights["params"]), jax.tree.leaves(raw["ema"]["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(weights["params"]), jax.tree.leaves(raw["params"])))


def test_with_no_fall_before_the_minimum_the_suggestion_is_the_steepest_anywhere():
    lrs = np.logspace(-6, 0, 7)
    smoothed = np.array([0.60, 0.70, 0.71, 0.69, 0.65, 0.90, 3.0])  # lowest at the start
    assert suggestion(lrs, smoothed) == lrs[1 + int(np.argmin(np.gradient(smoothed, np.log(lrs))[1:]))]
    assert suggestion(lrs, smoothed) == lrs[3]
