"""Training: data parallelism over 1/2/8 devices, freezing, schedules, loss, the loop."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import log_loss

from configs import default
from fracture_jax import parallel
from fracture_jax.errors import UserError
from fracture_jax.models import backbone_layers
from fracture_jax.models.builder import frozen_layers, initial_variables
from fracture_jax.train import (Phase, TrainState, bce_loss, compile_phase, dispatch_plan,
                                learning_rate_fn, train_and_evaluate)


NO_AUGMENTATION = {"data.augment.flip": False, "data.augment.rotate_deg": 0.0,
                   "data.augment.zoom": 0.0, "data.augment.brightness": 0.0,
                   "data.augment.contrast": 0.0}


def tiny_config(**overrides):
    c = default.get_config()
    c.model.name, c.model.image_size, c.model.pretrained, c.model.dropout = "smallcnn", 32, None, 0.0
    c.optimizer.name, c.optimizer.lr = "sgd", 0.05
    c.train.batch_size = 8
    c.train.allow_chance = True  # tiny runs on 24 images: tests that want the check say so
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return c


def start_phase(config, mesh, frozen=frozenset()):
    """(initial variables, the phase's compiled program, its replicated first state)."""
    variables, _ = initial_variables(config, jax.random.key(0))
    program = compile_phase(config, Phase(0, 0, frozen, 1.0), False, 10, mesh)
    state = parallel.replicate(TrainState.create(variables["params"], variables["batch_stats"],
                                                 program.init_opt_state(variables["params"])),
                               mesh)
    return variables, program, state


def run_steps(config, devices, frozen, batches, steps=3):
    mesh = parallel.make_mesh(devices)
    variables, program, state = start_phase(config, mesh, frozen)
    for i in range(steps):
        state, loss, _ = program.train_step(state, parallel.shard_batch(batches[i], mesh),
                                            jax.random.key(1))
    return variables, jax.device_get(state)


def _batches(n, batch=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, 2, batch).astype(np.int32)} for _ in range(n)]


def test_one_two_and_eight_devices_agree():
    """Same global batches -> same parameters and BatchNorm statistics on 1, 2 and 8 devices.
    Plain SGD, so a gradient N times too large (the shard_map trap) would show."""
    assert jax.device_count() == 8
    # Without augmentation: its images are the same on every device count (test_augment), but
    # XLA fuses them into the first layer per device batch, and three steps of SGD at 0.05
    # amplify those last-bit differences past float tolerance.
    config = tiny_config(**NO_AUGMENTATION, **{"optimizer.momentum": 0.0})
    batches = _batches(3)
    results = [run_steps(config, jax.devices()[:n], frozenset(), batches)[1] for n in (1, 2, 8)]
    start = initial_variables(config, jax.random.key(0))[0]
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), results[0].params,
                                         start["params"]))
    assert max(moved) > 1e-3  # the steps did change the parameters
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves((results[0].params, results[0].batch_stats)),
                        jax.tree.leaves((other.params, other.batch_stats))):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("freeze", ["all", "3"])
def test_frozen_layers_and_their_batchnorm_do_not_change(freeze):
    config = tiny_config()
    layers = backbone_layers("smallcnn")
    frozen = frozen_layers("smallcnn", freeze)
    assert len(frozen) == (len(layers) if freeze == "all" else 3)
    before, after = run_steps(config, jax.devices()[:2], frozen, _batches(3))
    for name in layers:
        for collection in ("params", "batch_stats"):
            old = before[collection]["backbone"].get(name)
            new = after.params["backbone"].get(name) if collection == "params" else \
                after.batch_stats["backbone"].get(name)
            if old is None:
                continue
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old),
                                                            jax.tree.leaves(new)))
            assert same == (name in frozen), (name, collection)
    head_old = before["params"]["fracture_logit"]["kernel"]
    assert not np.array_equal(head_old, after.params["fracture_logit"]["kernel"])


def test_frozen_layers_get_no_gradient_computed():
    """The optimizer state covers only the trainable layers: frozen ones are not in the
    differentiated tree at all (not merely zero-updated)."""
    config = tiny_config(**{"optimizer.name": "adam"})
    variables, _ = initial_variables(config, jax.random.key(0))
    program = compile_phase(config, Phase(0, 0, frozen_layers("smallcnn", "all"), 1.0), False,
                            10, parallel.make_mesh(jax.devices()[:1]))
    opt_state = program.init_opt_state(variables["params"])
    mu = opt_state[0].mu
    assert set(mu["backbone"]) == set() and set(mu) == {"backbone", "fracture_logit"}


def test_freeze_values():
    """The setting as layer names, the leading ones in Keras' order (conv before its BN)."""
    layers = backbone_layers("smallcnn")
    assert layers[:3] == ("block1_conv1", "block1_bn1", "block1_conv2")
    assert frozen_layers("smallcnn", "none") == frozenset()
    assert frozen_layers("smallcnn", "all") == frozenset(layers)
    assert frozen_layers("smallcnn", "4") == frozenset(layers[:4])
    assert frozen_layers("smallcnn", 40) == frozenset(layers)
    with pytest.raises(UserError):
        frozen_layers("smallcnn", "half")


def test_schedules():
    config = tiny_config(**{"optimizer.lr": 1e-3, "train.epochs": 10})
    config.schedule.name = "step_exp"
    config.schedule.constant_epochs, config.schedule.decay_rate = 3, 0.5
    lr = learning_rate_fn(config, steps_per_epoch=4)
    assert float(lr(0)) == pytest.approx(1e-3) and float(lr(11)) == pytest.approx(1e-3)
    assert float(lr(12)) == pytest.approx(5e-4) and float(lr(20)) == pytest.approx(1.25e-4)
    config.schedule.name, config.schedule.warmup_epochs = "warmup_cosine", 1.0
    lr = learning_rate_fn(config, steps_per_epoch=4)
    assert float(lr(0)) == 0.0 and float(lr(4)) == pytest.approx(1e-3)
    assert float(lr(40)) == pytest.approx(0.0, abs=1e-9)
    config.schedule.name = "nope"
    with pytest.raises(UserError):
        learning_rate_fn(config, 4)


def test_bce_loss_matches_scikit_learn():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 200)
    labels = rng.integers(0, 2, 200)
    probs = 1 / (1 + np.exp(-logits))
    ours = np.asarray(bce_loss(jnp.asarray(logits), jnp.asarray(labels))).mean()
    assert ours == pytest.approx(log_loss(labels, probs), rel=1e-5)
    weighted = np.asarray(bce_loss(jnp.asarray(logits), jnp.asarray(labels), pos_weight=3.0))
    expected = np.where(labels == 1, 3.0, 1.0) * -np.log(np.where(labels == 1, probs, 1 - probs))
    np.testing.assert_allclose(weighted, expected, rtol=1e-5)
    smooth = np.asarray(bce_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=0.2))
    y = labels * 0.8 + 0.1
    np.testing.assert_allclose(smooth, -(y * np.log(probs) + (1 - y) * np.log(1 - probs)),
                               rtol=1e-5)


def test_train_and_evaluate_end_to_end(phantom_root, tmp_path):
    config = tiny_config(**{"data.root": str(phantom_root), "data.num_workers": 0,
                            "train.epochs": 3, "train.patience": 5, "train.log_every": 1,
                            "train.head_epochs": 1, "train.freeze": "none"})
    state = train_and_evaluate(config, str(tmp_path))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(h["train_loss"]) and 0 <= h["val_accuracy"] <= 1 for h in history)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert set(final) == {"val", "test"}
    best_epoch = max(history, key=lambda h: h["val_auroc"])["epoch"]
    assert int(state.step) == best_epoch * 3  # 24 train images / batch 8: the best is restored
    assert list((tmp_path / "tensorboard").iterdir())
    assert len(list((tmp_path / "checkpoints" / "latest").iterdir())) == 1


def test_batch_must_split_over_devices(phantom_root, tmp_path):
    config = tiny_config(**{"data.root": str(phantom_root), "train.batch_size": 6})
    with pytest.raises(UserError, match="multiple of the device count"):
        train_and_evaluate(config, str(tmp_path))


def test_the_step_computes_its_finite_flag_once():
    """The flag that keeps a non-finite step from being applied is computed once, not copied
    into the select of every state leaf (XLA did: the and-chain times ~750 selects made the
    ResNet50 step compile 5x slower). Without the barrier this smallcnn step has ~2,600 ands."""
    config = tiny_config(**{"optimizer.name": "adam"})
    mesh = parallel.make_mesh(jax.devices()[:1])
    _, program, state = start_phase(config, mesh)
    batch = parallel.shard_batch(_batches(1)[0], mesh)
    hlo = program.train_step.lower(state, batch, jax.random.key(1)).compile().as_text()
    assert hlo.count(" and(") < 2 * len(jax.tree.leaves(state))


def test_steps_in_a_row_are_the_single_steps():
    """train.steps_per_dispatch=3: one call of three steps on stacked batches (augmentation on,
    two devices) gives bitwise the state, losses and logits of three single steps."""
    config = tiny_config(**{"optimizer.name": "adam", "train.steps_per_dispatch": 3})
    mesh = parallel.make_mesh(jax.devices()[:2])
    _, program, state = start_phase(config, mesh)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
                "label": rng.integers(0, 2, 8).astype(np.int32)} for _ in range(3)]
    single, losses, logits = jax.tree.map(np.array, state), [], []  # (the chain donates state)
    for batch in batches:
        single, loss, out = program.train_step(single, parallel.shard_batch(batch, mesh),
                                               jax.random.key(1))
        losses.append(loss)
        logits.append(out)
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    chained, chain_losses, chain_logits = program.train_chain(
        state, parallel.shard_batch(stacked, mesh, stacked=True), jax.random.key(1))
    assert chain_losses.shape == (3,) and chain_logits.shape == (3, 8)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(chained)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.stack(losses), np.asarray(chain_losses))
    assert np.array_equal(np.stack(logits), np.asarray(chain_logits))


@pytest.mark.parametrize("steps, chain, log_every, save_every", [
    (20, 4, 8, 0), (20, 4, 10, 6), (7, 3, 1, 0), (12, 5, 6, 4), (9, 1, 2, 3)])
def test_the_dispatch_plan(steps, chain, log_every, save_every):
    """Every step once, in order; runs of ``chain`` steps where no log step, checkpoint or epoch
    end falls before their last step, single steps only where one would; and a run resumed at
    the end of any call dispatches the rest as the uninterrupted one did."""
    def logs(i):
        return (i + 1) % log_every == 0 or i + 1 == steps

    def event(i, done):
        return logs(i) or (save_every and (done + i + 1) % save_every == 0) or i + 1 == steps

    for done in (0, 5):  # steps trained in epochs before this one
        plan = dispatch_plan(0, steps, done, chain, logs, save_every)
        assert [d.first for d in plan] == [0] + [d.end for d in plan[:-1]]
        assert plan[-1].end == steps
        for d in plan:
            assert d.count in (1, chain)
            assert not any(event(i, done) for i in range(d.first, d.end - 1))
            assert d.logs == logs(d.end - 1)
            assert d.saves == bool(save_every and (done + d.end) % save_every == 0)
            if d.count == 1 and chain > 1 and d.first + chain <= steps:
                assert any(event(i, done) for i in range(d.first, d.first + chain - 1))
        for k, d in enumerate(plan):
            assert dispatch_plan(d.end, steps, done + d.end, chain, logs, save_every) \
                == plan[k + 1:]
    if log_every % chain == 0 and steps % chain == 0 and not save_every:
        assert all(d.count == chain for d in plan)
