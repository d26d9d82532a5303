"""MixUp and CutMix on the device, inside the train step, after augmentation.

With probability ``prob`` a device's share of the batch is mixed with itself in reverse order
(example i with example n-1-i, as timm pairs a batch with its flip): MixUp blends the two
images, ``lam x_i + (1 - lam) x_j`` with ``lam ~ Beta(mixup_alpha, mixup_alpha)``; CutMix
pastes a box of the partner covering ``1 - lam`` of the image (``lam ~ Beta(cutmix_alpha,
cutmix_alpha)``, then recomputed from the clipped box). With both on, each mixed batch is
one or the other with even odds. The binary targets mix with the same weight:
``lam y_i + (1 - lam) y_j``. Everything comes from the step's key folded with the device's
index, so it is deterministic; pairs form within a device's share, so (as under PyTorch DDP)
the pairing depends on the device count. Never applied in evaluation.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mixing:
    """``config.data``'s mixing settings as a hashable value."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0

    @classmethod
    def from_config(cls, data) -> "Mixing":
        return cls(data.mixup_alpha, data.cutmix_alpha, data.mix_prob)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def cut_box(key, lam, height: int, width: int):
    """A box covering about ``1 - lam`` of the image at a uniform centre, clipped to it:
    (top, bottom, left, right) and the share of the image outside it."""
    cy, cx = jax.random.uniform(key, (2,))
    half = jnp.sqrt(1.0 - lam) / 2.0
    top = jnp.clip(jnp.round((cy - half) * height), 0, height).astype(jnp.int32)
    bottom = jnp.clip(jnp.round((cy + half) * height), 0, height).astype(jnp.int32)
    left = jnp.clip(jnp.round((cx - half) * width), 0, width).astype(jnp.int32)
    right = jnp.clip(jnp.round((cx + half) * width), 0, width).astype(jnp.int32)
    outside = 1.0 - (bottom - top) * (right - left) / (height * width)
    return (top, bottom, left, right), outside


def mix_batch(images, labels, key, mixing: Mixing):
    """(images, float targets, lam) of one device's share of a batch, mixed or not."""
    targets = labels.astype(jnp.float32)
    if not mixing.active:
        return images, targets, jnp.float32(1.0)
    k_apply, k_kind, k_lam, k_box = jax.random.split(key, 4)
    partner_images, partner_targets = images[::-1], targets[::-1]
    use_cut = (jax.random.uniform(k_kind) < 0.5) if mixing.mixup_alpha and mixing.cutmix_alpha \
        else jnp.asarray(mixing.cutmix_alpha > 0)
    alpha = jnp.where(use_cut, mixing.cutmix_alpha or 1.0, mixing.mixup_alpha or 1.0)
    lam = jax.random.beta(k_lam, alpha, alpha)
    (top, bottom, left, right), outside = cut_box(k_box, lam, images.shape[1], images.shape[2])
    kinds = []  # only the kinds that are on are computed
    if mixing.cutmix_alpha:
        rows = jnp.arange(images.shape[1])[:, None]
        cols = jnp.arange(images.shape[2])[None, :]
        inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        kinds.append(jnp.where(inside[None, :, :, None], partner_images, images))
    if mixing.mixup_alpha:
        kinds.append(lam * images + (1.0 - lam) * partner_images)
    together = jnp.where(use_cut, *kinds) if len(kinds) == 2 else kinds[0]
    lam = jnp.where(use_cut, outside, lam)
    mixed = jax.random.uniform(k_apply) < mixing.prob
    lam = jnp.where(mixed, lam, 1.0)
    images = jnp.where(mixed, together, images)
    return images, lam * targets + (1.0 - lam) * partner_targets, lam
