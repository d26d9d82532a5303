"""Per-example image transforms on decoded PIL images: resize, and random augmentation.

Every random choice comes from the ``np.random.Generator`` grain derives from the pipeline
seed and the example's index, so an augmented example is the same in every run.
"""

import numpy as np
from PIL import Image

from fracture_jax.data.decode import to_array


def resize(img: Image.Image, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` (the seed's ``image_size``), antialiased bilinear."""
    return to_array(img.resize((size, size), Image.BILINEAR))


def augment(img: Image.Image, size: int, rng: np.random.Generator, cfg) -> np.ndarray:
    """Random zoom (crop), rotation, flip, brightness and contrast, then float (S, S, 3) 0-255."""
    w, h = img.size
    if cfg.zoom > 0:
        scale = 1.0 - rng.uniform(0.0, cfg.zoom)
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = img.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch)))
    img = img.resize((size, size), Image.BILINEAR)
    if cfg.rotate_deg > 0:
        img = img.rotate(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg), Image.BILINEAR)
    x = to_array(img)
    if cfg.flip and rng.random() < 0.5:
        x = x[:, ::-1]
    if cfg.contrast > 0:
        mean = x.mean()
        x = (x - mean) * rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast) + mean
    if cfg.brightness > 0:
        x = x + 255.0 * rng.uniform(-cfg.brightness, cfg.brightness)
    return np.clip(x, 0.0, 255.0, dtype=np.float32) if (cfg.contrast or cfg.brightness) \
        else np.ascontiguousarray(x)
