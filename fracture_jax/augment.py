"""Augmentation and resizing on the device, inside the jitted step, on uint8 batches.

Each example of a train batch gets a random zoom (a crop of ``1 - U(0, zoom)`` of each side at
a random place), a rotation about the centre by ``U(-rotate_deg, rotate_deg)`` degrees, a
horizontal flip with probability 1/2, then a contrast factor ``U(1 - contrast, 1 + contrast)``
about the image's mean and a brightness shift of ``255 U(-brightness, brightness)``, clipped to
0-255. The geometry is one affine map from each output pixel to a point of the stored image,
sampled bilinearly (zero outside, as a rotation's corners). Every random number comes from the
step's key folded with the example's position in the global batch, so an example's
augmentation does not depend on the device count or on which host read it.
"""

import dataclasses

import jax
import jax.numpy as jnp

_DRAWS = 7  # uniforms per example: zoom, crop x, crop y, angle, flip, contrast, brightness


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation switches and strengths (``config.data.augment`` as a hashable value)."""

    flip: bool = True
    rotate_deg: float = 10.0
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "Augment":
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})

    @property
    def active(self) -> bool:
        return any(dataclasses.astuple(self))


NONE = Augment(flip=False, rotate_deg=0.0, zoom=0.0, brightness=0.0, contrast=0.0)


def draws(key, positions, aug: Augment) -> dict:
    """Each example's random parameters, from ``key`` and its position in the global batch."""
    u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p), (_DRAWS,)))(positions)
    scale = 1.0 - aug.zoom * u[:, 0]
    return {"scale": scale, "x0": (1.0 - scale) * u[:, 1], "y0": (1.0 - scale) * u[:, 2],
            "angle": jnp.deg2rad(aug.rotate_deg * (2.0 * u[:, 3] - 1.0)),
            "flip": (u[:, 4] < 0.5) & aug.flip,
            "contrast": 1.0 + aug.contrast * (2.0 * u[:, 5] - 1.0),
            "brightness": 255.0 * aug.brightness * (2.0 * u[:, 6] - 1.0)}


def identity(n: int) -> dict:
    """Parameters that change nothing: the stored image resized to the output's size."""
    zeros = jnp.zeros((n,), jnp.float32)
    return {"scale": zeros + 1.0, "x0": zeros, "y0": zeros, "angle": zeros,
            "flip": jnp.zeros((n,), bool), "contrast": zeros + 1.0, "brightness": zeros}


def sample_points(p: dict, side_in: int, side_out: int):
    """(rows, cols) (side_out, side_out) of the stored image that each output pixel samples,
    for one example's parameters ``p``, in the stored image's pixel coordinates."""
    centres = (jnp.arange(side_out, dtype=jnp.float32) + 0.5) / side_out
    v, u = jnp.meshgrid(centres, centres, indexing="ij")  # output, in [0, 1]
    u = jnp.where(p["flip"], 1.0 - u, u)
    cos, sin = jnp.cos(p["angle"]), jnp.sin(p["angle"])
    du, dv = u - 0.5, v - 0.5
    u, v = cos * du - sin * dv + 0.5, sin * du + cos * dv + 0.5  # rotated about the centre
    x, y = p["x0"] + p["scale"] * u, p["y0"] + p["scale"] * v  # into the crop
    return y * side_in - 0.5, x * side_in - 0.5


def bilinear(image, rows, cols):
    """``image`` (H, W, C) sampled at float ``rows``, ``cols``; zero outside."""
    h, w = image.shape[:2]
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)

    def at(r, c):
        inside = ((r >= 0) & (r < h) & (c >= 0) & (c < w))[..., None]
        return jnp.where(inside, image[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)], 0.0)

    return ((1 - fr) * ((1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1))
            + fr * ((1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)))


def transform(image, p: dict, side_out: int, aug: Augment):
    """One stored uint8 image (S, S, 3) -> the augmented float32 (side_out, side_out, 3)."""
    x = bilinear(image.astype(jnp.float32), *sample_points(p, image.shape[0], side_out))
    if aug.contrast or aug.brightness:
        mean = jnp.mean(x)
        x = jnp.clip((x - mean) * p["contrast"] + mean + p["brightness"], 0.0, 255.0)
    return x


def augment_batch(images, key, positions, aug: Augment, side_out: int):
    """A uint8 batch (N, S, S, 3) augmented, float32 (N, side_out, side_out, 3)."""
    return jax.vmap(transform, (0, 0, None, None))(images, draws(key, positions, aug), side_out,
                                                   aug)


def model_input(images, side_out: int):
    """A batch as the model takes it: float32 at ``side_out``, resized bilinearly where the
    stored side differs (a plain cast where it is the same)."""
    if images.shape[1:3] == (side_out, side_out):
        return images.astype(jnp.float32)
    return jax.vmap(transform, (0, 0, None, None))(images, identity(images.shape[0]), side_out,
                                                   NONE)
