"""Every switch of the kernels in one place: environment variables, the portable (export)
mode and the platform.

The environment is read once per process (``switches``); a test that changes it calls
``switches.cache_clear()``. ``fast_cpu`` says whether a layer takes the CPU paths at all;
``describe`` says which kernels a run uses, for its log and its records.

=============================  ===========================================================
``FRACTURE_JAX_ONEDNN=0``      XLA's convolutions instead of oneDNN's
``FRACTURE_JAX_ONEDNN_LIB``    the path of ``libdnnl.so.3`` (default: the pip wheel's)
``FRACTURE_JAX_NATIVE=0``      no compiled C/C++ (then no oneDNN either: it runs through
                               the compiled FFI handler)
``CC``, ``CXX``                the compilers of the native kernels (``cc``, ``c++``)
``XDG_CACHE_HOME``             where compiled kernels are cached (``~/.cache``)
``FRACTURE_JAX_HUGE_PAGES=0``  no malloc tunables and no restart (``host_memory``)
``FRACTURE_JAX_KEEP_MAPPED``   1: keep XLA's buffers mapped between steps; 0: huge pages
                               only; unset: keep them where memory allows (``host_memory``)
=============================  ===========================================================
"""

import contextlib
import contextvars
import dataclasses
import functools
import os
from pathlib import Path

_PORTABLE = contextvars.ContextVar("portable", default=False)


@dataclasses.dataclass(frozen=True)
class Switches:
    """The environment's settings for the kernels."""

    onednn: bool
    onednn_lib: str | None
    native: bool
    c_compiler: str
    cxx_compiler: str
    cache_dir: Path
    host_memory: bool
    keep_mapped: str  # "1", "0" or "auto"


@functools.cache
def switches() -> Switches:
    env = os.environ
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fracture_jax" / "native"
    return Switches(onednn=env.get("FRACTURE_JAX_ONEDNN", "1") != "0",
                    onednn_lib=env.get("FRACTURE_JAX_ONEDNN_LIB") or None,
                    native=env.get("FRACTURE_JAX_NATIVE", "1") != "0",
                    c_compiler=env.get("CC", "cc"), cxx_compiler=env.get("CXX", "c++"),
                    cache_dir=cache, host_memory=env.get("FRACTURE_JAX_HUGE_PAGES") != "0",
                    keep_mapped=env.get("FRACTURE_JAX_KEEP_MAPPED", "auto"))


@contextlib.contextmanager
def portable():
    """Trace with the plain XLA operations everywhere (for export), not the CPU fast paths."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def platform() -> str:
    import jax
    return jax.default_backend()


def fast_cpu() -> bool:
    """Whether layers traced now take the CPU paths: on CPU, outside ``portable``."""
    return platform() == "cpu" and not _PORTABLE.get()


def onednn_runs(*arrays) -> bool:
    """Whether oneDNN computes a convolution of ``arrays``: CPU paths, float32, library loaded."""
    import jax.numpy as jnp

    from fracture_jax.kernels import onednn
    return (fast_cpu() and all(a.dtype == jnp.float32 for a in arrays) and onednn.available())


@functools.cache
def describe() -> dict:
    """The kernels this process runs, by name: what a result was computed with (found once;
    logged at start and written into every checkpoint's metadata)."""
    from fracture_jax.kernels import host_memory, onednn, winograd
    if platform() != "cpu":
        return {"platform": platform(), "convolutions": "XLA"}
    return {"platform": "cpu",
            "convolutions": f"oneDNN ({onednn.library_path()})" if onednn.available()
            else "XLA, with matmul kernel gradients and shifted-sum depthwise convolutions",
            "winograd": ("F(2x2,3x3), C input transform" if winograd.native_transform()
                         else "F(2x2,3x3), XLA input transform") if onednn.available() else "off",
            "malloc_tunables": host_memory.active() or "none",
            "xla_buffers": host_memory.decision() or "as the process started"}
