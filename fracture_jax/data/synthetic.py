"""Synthetic X-ray phantoms in the seed's folder layout, for the demo and the tests.

Each image is a projection radiograph of one or two long bones (a cortical tube around
marrow, flaring at the ends) in soft tissue, with varied pose, exposure, blur and quantum
noise. Fractured images carry one break, transverse, oblique, comminuted or incomplete
(one cortex only), at a random position with random gap, displacement and angulation. Both
classes carry look-alikes (nutrient canals through one cortex, overlapping bones, growth
plates), so the task takes a real model, not a threshold on one pixel.

Beside the images, ``write_phantoms`` writes what it drew, in the format of FracAtlas' tables:
``metadata.csv`` (bone type, fracture type, look-alike per image) and ``fracture_boxes.csv``
(the box around each break, in pixels of the stored image), so an evaluation can ask where the
model fails and whether it looks at the break.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fracture_jax.data.scan import CLASS_NAMES
from fracture_jax.files import write_csv

SPLITS = {"train": 1.0, "val": 0.25, "test": 0.25}  # images per class, relative to train


def _tube(v, radius, inner):
    """Projected thickness of a cortical tube (outer ``radius``, marrow ``inner``) at offset v."""
    outer = np.sqrt(np.clip(radius**2 - v**2, 0, None))
    marrow = np.sqrt(np.clip(inner**2 - v**2, 0, None))
    return outer - 0.75 * marrow  # marrow attenuates a quarter as much as cortex


def _bone(u, v, half_len, radius, rng):
    """Attenuation of one bone in its own coordinates (u along the shaft, v across it)."""
    flare = 1.0 + 0.6 * np.exp(-(((np.abs(u) - half_len) / (0.35 * radius + 4)) ** 2))
    r = radius * flare
    inner = r * rng.uniform(0.5, 0.7)
    ends = 1.0 / (1.0 + np.exp((np.abs(u) - half_len - 0.5 * radius) / 2.0))
    return _tube(v, r, inner) * ends


def _rotate(x, y, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _fracture(u, v, half_len, radius, rng):
    """(a broken bone, its kind, the region of the break): two fragments on either side of a
    fracture line, plus its gap."""
    kind = rng.choice(["transverse", "oblique", "comminuted", "incomplete"], p=[.35, .35, .15, .15])
    u0 = rng.uniform(-0.45, 0.45) * half_len
    phi = rng.uniform(-0.25, 0.25) if kind in ("transverse", "incomplete") else \
        rng.choice([-1, 1]) * rng.uniform(0.35, 1.0)
    s = (u - u0) * np.cos(phi) + v * np.sin(phi)  # signed distance to the fracture line
    gap = rng.uniform(0.4, 0.8) * radius
    if kind == "incomplete":  # a crack through one cortex only, no displacement
        side = rng.choice([-1, 1])
        mask = (np.abs(s) < gap / 2) & (side * v > rng.uniform(-0.3, 0.1) * radius)
        region = mask & (np.abs(v) < 1.1 * radius)
        return _bone(u, v, half_len, radius, rng) * np.where(mask, 0.05, 1.0), kind, region
    shift = rng.uniform(0.2, 0.7) * radius * rng.choice([-1, 1])
    angulation = rng.uniform(-0.2, 0.2)
    uf, vf = _rotate(u - u0, v, angulation)
    far = _bone(uf + u0 + rng.uniform(-1.0, 2.0), vf - shift, half_len, radius, rng)
    near = _bone(u, v, half_len, radius, rng)
    img = np.where(s < 0, near, far) * np.where(np.abs(s) < gap / 2, 0.05, 1.0)
    width = np.abs(v) < 1.1 * radius + abs(shift)  # across both fragments
    region = (np.abs(s) < gap / 2 + 1) & width
    if kind == "comminuted":  # a second line close by, leaving a butterfly fragment
        s2 = (u - u0 - rng.uniform(3, 8)) * np.cos(-phi) + v * np.sin(-phi)
        img = img * np.where(np.abs(s2) < gap / 2, 0.2, 1.0)
        region |= (np.abs(s2) < gap / 2 + 1) & width
    return img, kind, region


def _lookalike(u, v, radius, half_len, rng):
    """(a benign line, its kind): a nutrient canal crossing one cortex obliquely, or a growth
    plate."""
    if rng.random() < 0.5:
        u0 = rng.uniform(-0.5, 0.5) * half_len
        s = (u - u0) * np.cos(1.1) + v * np.sin(1.1)
        side = rng.choice([-1, 1])
        mask = (np.abs(s) < 0.4) & (side * v > 0.55 * radius) & (side * v < radius * 1.05)
        return np.where(mask, 0.75, 1.0), "nutrient canal"
    u0 = rng.choice([-1, 1]) * half_len * rng.uniform(0.8, 0.95)
    return np.where(np.abs(u - u0) < 0.6, 0.85, 1.0), "growth plate"


def phantom(rng: np.random.Generator, size: int = 256, fractured: bool = False) -> np.ndarray:
    """One phantom radiograph as uint8 (size, size)."""
    return phantom_with_truth(rng, size, fractured)[0]


def _box(region) -> list[int] | None:
    """[x_min, y_min, x_max, y_max] around a mask's pixels (edges, so x_max is exclusive)."""
    rows, cols = np.nonzero(region)
    if not rows.size:
        return None
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def phantom_with_truth(rng: np.random.Generator, size: int = 256, fractured: bool = False
                       ) -> tuple[np.ndarray, dict, list]:
    """(image uint8 (size, size), its attributes, the boxes around its break) of one phantom:
    ``{"bone_type", "fracture_type", "lookalike"}``, boxes ``[x_min, y_min, x_max, y_max]``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - size / 2
    theta = rng.uniform(-0.5, 0.5) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
    cx, cy = rng.uniform(-0.12, 0.12, 2) * size
    u, v = _rotate(y - cy, x - cx, theta)
    half_len = rng.uniform(0.3, 0.55) * size
    radius = rng.uniform(0.045, 0.08) * size

    tissue_w = radius * rng.uniform(2.5, 4.5)
    tissue = 1.0 / (1.0 + np.exp((np.abs(v) - tissue_w) / (0.1 * tissue_w)))
    tissue *= 1.0 / (1.0 + np.exp((np.abs(u) - 1.4 * half_len) / 6.0))
    tissue *= 1.0 + 0.15 * np.sin(u / rng.uniform(15, 40) + rng.uniform(0, 6))
    atten = 0.2 * tissue * rng.uniform(0.7, 1.3)

    truth = {"bone_type": "single", "fracture_type": "none", "lookalike": "none"}
    boxes = []
    if fractured:
        bone, kind, region = _fracture(u, v, half_len, radius, rng)
        truth["fracture_type"] = str(kind)
        boxes = [b for b in [_box(region)] if b]
    else:
        bone = _bone(u, v, half_len, radius, rng)
    if rng.random() < 0.35:
        line, truth["lookalike"] = _lookalike(u, v, radius, half_len, rng)
        bone = bone * line
    if rng.random() < 0.5:  # a second, parallel bone (radius and ulna, tibia and fibula)
        truth["bone_type"] = "paired"
        gap = radius * rng.uniform(1.9, 2.8) * rng.choice([-1, 1])
        bone = bone + _bone(u + rng.uniform(-10, 10), v - gap, half_len * 0.95,
                            radius * rng.uniform(0.55, 0.85), rng)
    atten = atten + bone / radius * rng.uniform(0.35, 0.55)

    exposure = rng.uniform(0.8, 1.25)
    img = 1.0 - np.exp(-2.2 * atten * exposure)  # bright where the beam is absorbed
    img = img + rng.uniform(0.0, 0.08) + 0.05 * (x / size) * rng.uniform(-1, 1)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    pil = Image.fromarray((img * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8) * size / 256))
    img = np.asarray(pil, np.float32) / 255.0
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape) * np.sqrt(img + 0.05)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), truth, boxes


METADATA, BOXES = "metadata.csv", "fracture_boxes.csv"


def write_phantoms(root: str, per_class: int = 120, size: int = 256, seed: int = 0) -> Path:
    """Write the seed's folder layout of phantoms under ``root``; deterministic by ``seed``.

    ``per_class`` images per class in train, a quarter as many in val and in test. Most are
    JPEG (quality 90), every fifth PNG; ``metadata.csv`` and ``fracture_boxes.csv`` beside
    them. An existing complete set is kept as it is.
    """
    root = Path(root).expanduser()
    done = root / ".complete"
    key = f"{per_class} {size} {seed} truth"
    if done.is_file() and done.read_text() == key:
        return root
    metadata, boxes = [], []
    for s, (split, frac) in enumerate(SPLITS.items()):
        n = max(2, round(per_class * frac))
        for label, cls in enumerate(CLASS_NAMES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, s, label, i])
                pixels, truth, drawn = phantom_with_truth(rng, size, fractured=bool(label))
                fmt = "png" if i % 5 == 4 else "jpg"
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "PNG" if fmt == "png" else "JPEG", quality=90)
                name = f"{cls}_{i:04d}.{fmt}"
                (folder / name).write_bytes(buf.getvalue())
                rel = f"{split}/{cls}/{name}"
                metadata.append({"file": rel} | truth)
                boxes += [[rel, *box] for box in drawn]
    write_csv(root / METADATA, list(metadata[0]), [list(m.values()) for m in metadata])
    write_csv(root / BOXES, ["file", "x_min", "y_min", "x_max", "y_max"], boxes)
    done.write_text(key)
    return root

