"""Test setup: 8 faked CPU devices (set before JAX is imported), Keras on JAX, absl flags parsed.

Real X-rays come from ``../shared/data/fracatlas`` (or ``$FRACATLAS_DIR``) when present;
otherwise the tests that use them run on phantoms generated here.
"""

import importlib
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

REPO = Path(__file__).resolve().parents[1]
FRACATLAS = Path(os.environ.get("FRACATLAS_DIR", REPO.parent / "shared" / "data" / "fracatlas"))


@pytest.fixture(scope="session", autouse=True)
def _children_share_one_xla_cache(tmp_path_factory):
    """The ``main.py`` processes the tests start compile the same programs: with one persistent
    XLA cache for the session each is compiled once (a resume test's tiny run: 54 s, then 39 s
    once its programs are cached). Set after JAX's import, so this process does not use it."""
    importlib.import_module("jax")  # JAX reads its settings when imported
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small phantom data set in the seed's layout (12 train images per class, 64 px)."""
    from fracture_jax.data.synthetic import write_phantoms
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), per_class=12, size=64, seed=0)


@pytest.fixture(scope="session")
def xray_root(tmp_path_factory) -> Path:
    """The real FracAtlas X-rays when available, else a larger phantom set in their place."""
    if FRACATLAS.is_dir():
        return FRACATLAS
    from fracture_jax.data.synthetic import write_phantoms
    return write_phantoms(tmp_path_factory.mktemp("xrays"), per_class=16, size=320, seed=1)


@pytest.fixture(scope="session")
def xray_batch(xray_root):
    """Four real X-rays (two per class) as PIL images, decoded by the project's decoder."""
    from fracture_jax.data.decode import decode
    files = []
    for cls in ("fractured", "not_fractured"):
        files += sorted((xray_root / "train" / cls).iterdir())[:2]
    return [decode(f.read_bytes(), f.name) for f in files]


def images_at(pil_images, size: int) -> np.ndarray:
    """PIL images -> float32 (N, size, size, 3) RGB 0-255."""
    from fracture_jax.data.decode import resize
    return np.stack([resize(img, size) for img in pil_images])
