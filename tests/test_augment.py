"""Augmentation on the device: equal to a plain numpy/scipy version of the same transform,
deterministic, and the same on 1 and 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.sharding import NamedSharding, PartitionSpec as P

from fracture_jax import parallel
from fracture_jax.augment import Augment, augment_batch, draws, model_input
from fracture_jax.train import step_images

STRONG = Augment(flip=True, rotate_deg=25.0, zoom=0.3, brightness=0.2, contrast=0.3)


def reference(image: np.ndarray, p: dict, side_out: int, aug: Augment) -> np.ndarray:
    """The transform written out in float64: output pixel centres, flipped, rotated about the
    centre, mapped into the crop, then bilinear sampling with zeros outside (scipy), then
    contrast about the mean, brightness and clipping."""
    side_in = image.shape[0]
    centres = (np.arange(side_out) + 0.5) / side_out
    v, u = np.meshgrid(centres, centres, indexing="ij")
    if p["flip"]:
        u = 1.0 - u
    a = float(p["angle"])
    ru = np.cos(a) * (u - 0.5) - np.sin(a) * (v - 0.5) + 0.5
    rv = np.sin(a) * (u - 0.5) + np.cos(a) * (v - 0.5) + 0.5
    x = float(p["x0"]) + float(p["scale"]) * ru
    y = float(p["y0"]) + float(p["scale"]) * rv
    coords = [y * side_in - 0.5, x * side_in - 0.5]
    out = np.stack([ndi.map_coordinates(image[..., c].astype(np.float64), coords, order=1,
                                        mode="grid-constant", cval=0.0) for c in range(3)], -1)
    if aug.contrast or aug.brightness:
        out = np.clip((out - out.mean()) * float(p["contrast"]) + out.mean()
                      + float(p["brightness"]), 0, 255)
    return out


def _images(n, side, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side, 3)).astype(np.uint8)


@pytest.mark.parametrize("side_in, side_out", [(40, 40), (48, 32), (30, 44)])
def test_equals_the_numpy_reference(side_in, side_out):
    images = _images(6, side_in)
    key, positions = jax.random.key(5), jnp.arange(6)
    ours = np.asarray(augment_batch(jnp.asarray(images), key, positions, STRONG, side_out))
    params = jax.device_get(draws(key, positions, STRONG))
    assert params["flip"].any() and not params["flip"].all()  # both cases are checked
    for i in range(6):
        p = {k: v[i] for k, v in params.items()}
        np.testing.assert_allclose(ours[i], reference(images[i], p, side_out, STRONG),
                                   atol=0.02, rtol=0)


def test_draws_stay_within_the_configured_strengths():
    p = jax.device_get(draws(jax.random.key(0), jnp.arange(2000), STRONG))
    assert 0.7 <= p["scale"].min() and p["scale"].max() <= 1.0
    assert (p["x0"] >= 0).all() and (p["x0"] + p["scale"] <= 1 + 1e-6).all()
    assert np.abs(np.rad2deg(p["angle"])).max() <= 25.0 + 1e-4
    assert 0.45 < p["flip"].mean() < 0.55
    assert 0.7 <= p["contrast"].min() and p["contrast"].max() <= 1.3
    assert np.abs(p["brightness"]).max() <= 0.2 * 255 + 1e-3


def test_deterministic_and_different_per_key_and_position():
    images = jnp.asarray(_images(4, 32))
    run = jax.jit(lambda k, pos: augment_batch(images, k, pos, STRONG, 32))
    a = run(jax.random.key(1), jnp.arange(4))
    np.testing.assert_array_equal(a, run(jax.random.key(1), jnp.arange(4)))
    assert not np.allclose(a, run(jax.random.key(2), jnp.arange(4)))
    swapped = run(jax.random.key(1), jnp.arange(4)[::-1])  # positions decide, not the order
    assert not np.allclose(a[0], swapped[0])
    np.testing.assert_array_equal(a[0], run(jax.random.key(1), jnp.asarray([0, 9, 9, 9]))[0])


def test_resize_only_is_a_plain_cast_at_the_stored_side():
    images = _images(3, 24)
    np.testing.assert_array_equal(model_input(jnp.asarray(images), 24), images.astype(np.float32))
    assert model_input(jnp.asarray(images), 16).shape == (3, 16, 16, 3)


@pytest.mark.parametrize("augment", [STRONG, None])
def test_the_same_on_one_and_four_devices(augment):
    """Each example's augmentation follows its position in the global batch, not the device
    that holds it."""
    images = _images(8, 36, seed=3)

    def on(n):
        mesh = parallel.make_mesh(jax.devices()[:n])
        run = jax.jit(jax.shard_map(
            lambda x, rng: step_images(x, jnp.int32(7), rng, augment, 28), mesh=mesh,
            in_specs=(P(parallel.AXIS), P()), out_specs=P(parallel.AXIS)))
        x = jax.device_put(images, NamedSharding(mesh, P(parallel.AXIS)))
        return np.asarray(run(x, jax.random.key(11)))

    one, four = on(1), on(4)
    assert one.shape == (8, 28, 28, 3)
    if augment is not None:
        np.testing.assert_array_equal(one, four)
    else:  # the constant identity map: XLA folds it differently for 8 and 2 images a device
        np.testing.assert_allclose(one, four, atol=2e-3, rtol=0)
