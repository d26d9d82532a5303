"""The native kernels: compiled once into the cache, equal to their XLA versions, a clear
fallback where no compiler works, and the FFI handler built against jaxlib's headers."""

import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracture_jax.kernels import ffi, native, policy, winograd


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache, and no library or plan left from earlier tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    caches = (policy.switches, native.library, winograd.native_transform,
              winograd._native_transform_plan)
    for cached in caches:
        cached.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    for cached in caches:
        cached.cache_clear()


def has_compiler() -> bool:
    return shutil.which(os.environ.get("CC", "cc")) is not None


@pytest.mark.parametrize("shape", [(2, 9, 7, 5), (1, 8, 8, 19), (3, 1, 2, 16)])
def test_winograd_transform_equals_xla_exactly(fresh, shape):
    """Odd and even sides (the last tile cut off), channel counts off the vector width."""
    if not has_compiler():
        pytest.skip("no C compiler on this machine")
    x = jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32)
    native_values = jax.jit(winograd.input_transform)(x)
    assert winograd._native_transform_plan(shape) is not None
    np.testing.assert_array_equal(native_values, jax.jit(winograd._xla_input_transform)(x))


def test_the_library_is_built_once_and_then_loaded_from_the_cache(fresh):
    if not has_compiler():
        pytest.skip("no C compiler on this machine")
    first = native.build("winograd")
    assert first.parent == fresh / "fracture_jax" / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native.build("winograd") == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.partial"))


@pytest.mark.parametrize("compiler, error", [("/nonexistent/cc", "No such file"),
                                             ("false", "could not compile")])
def test_without_a_working_compiler_xla_computes_the_same(fresh, monkeypatch, caplog, compiler,
                                                          error):
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING):
        assert native.library("winograd") is None
    assert error in caplog.text and "XLA version runs instead" in caplog.text
    assert not list(fresh.rglob("*.so")) and not list(fresh.rglob("*.partial"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 6, 3)), jnp.float32)
    assert "ffi_call" not in str(jax.make_jaxpr(winograd.input_transform)(x))
    np.testing.assert_array_equal(winograd.input_transform(x), winograd._xla_input_transform(x))


def test_opt_out_keeps_xla(fresh, monkeypatch):
    monkeypatch.setenv("FRACTURE_JAX_NATIVE", "0")
    policy.switches.cache_clear()
    assert native.library("winograd") is None


def test_the_ffi_handler_is_compiled_against_jaxlibs_headers(fresh):
    """C++ against ``jax.ffi.include_dir()``: the key changes with the headers, so a jaxlib
    with another FFI gets a handler built for it; the registered handler runs plans."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    source = Path(native.__file__).with_name("ffi_handler.cc")
    compiler, flags, depends = native._command(source)
    assert f"-I{jax.ffi.include_dir()}" in flags
    assert "XLA_FFI_API_MAJOR" in depends  # the headers' text is part of the cache key
    library = native.build("ffi_handler")
    assert library.parent == fresh / "fracture_jax" / "native"
    assert ffi.available()
    transform = winograd.native_transform()
    plan = ffi.Plan()  # one C function step, run by the handler with no Python
    plan.function(transform, (ffi.ARGUMENT, 0), (ffi.RESULT, 0), (1, 4, 6, 3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 6, 3)), jnp.float32)
    out = jax.jit(lambda x: ffi.call(plan.number, (16, 6, 3), x))(x)
    np.testing.assert_array_equal(out, jax.jit(winograd._xla_input_transform)(x))
