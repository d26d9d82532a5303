"""The CPU convolutions (oneDNN's, depthwise as shifted sums, hand-written gradients) against
XLA's own."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from fracture_jax.models import layers, onednn

CASES = [(13, 11, 3, 1, "SAME"), (13, 12, 3, 2, "SAME"), (14, 14, 5, 2, "SAME"),
         (9, 10, 5, 1, "VALID"), (16, 16, 3, 2, ((0, 1), (0, 1))), (17, 15, 5, 2, "VALID")]


def xla_depthwise(x, kernel, strides, padding):
    kh, kw, c, _ = kernel.shape
    return lax.conv_general_dilated(x, kernel.reshape(kh, kw, 1, c), (strides,) * 2, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=c)


def xla_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, (strides,) * 2, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


DENSE = [(13, 11, 3, 1, "SAME", 5), (13, 12, 3, 2, "SAME", 3), (16, 15, 7, 2, "SAME", 6),
         (9, 10, 3, 1, "VALID", 2), (16, 16, 3, 2, ((0, 1), (0, 1)), 4)]


def loss(conv, strides, padding):
    return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, strides, padding)))


def relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture
def without_onednn(monkeypatch):
    """The XLA paths, which CPUs without oneDNN's library take."""
    monkeypatch.setattr(onednn, "available", lambda: False)


def test_onednn_loads_where_its_wheel_exists():
    """requirements.txt installs oneDNN's library on x86-64 Linux; elsewhere XLA's paths run."""
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert onednn.available()
    code = "from fracture_jax.models import onednn; print(onednn.available())"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FRACTURE_JAX_ONEDNN": "0"})
    assert off.stdout.strip() == "False"


ONEDNN = [(13, 11, 3, 1, "SAME", 8, 5), (13, 12, 3, 2, "SAME", 8, 3),
          (16, 15, 7, 2, "VALID", 3, 6), (16, 16, 3, 2, ((0, 1), (0, 1)), 4, 4),
          (9, 10, 1, 1, "VALID", 6, 5), (9, 10, 1, 2, "VALID", 6, 5)]


@pytest.mark.parametrize("h,w,k,strides,padding,cin,cout", ONEDNN)
def test_onednn_value_and_gradients_match_xla(h, w, k, strides, padding, cin, cout):
    """oneDNN computes the value (and a larger kernel's gradients) inside the XLA program."""
    if not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    rng = np.random.default_rng(k * 100 + h)
    x = jnp.asarray(rng.standard_normal((3, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    grad = jax.jit(jax.grad(loss(layers.conv2d, strides, padding), (0, 1)))
    calls = str(jax.make_jaxpr(grad)(x, kernel)).count("ffi_call")
    assert calls == (1 if k == 1 else 3)  # a 1x1 kernel's gradients are matmuls
    assert relative(jax.jit(layers.conv2d, static_argnums=(2, 3))(x, kernel, strides, padding),
                    xla_conv(x, kernel, strides, padding)) < 1e-6
    want = jax.grad(loss(xla_conv, strides, padding), (0, 1))(x, kernel)
    for g, r in zip(grad(x, kernel), want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


def test_onednn_failure_reaches_the_caller():
    """An error inside the custom call is raised by XLA with oneDNN's message, not swallowed."""
    if not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    bad = jax.ffi.ffi_call(onednn._TARGET, jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(Exception, match="oneDNN"):
        jax.block_until_ready(jax.jit(lambda x: bad(x, plan=np.int64(10**9)))(jnp.ones(2)))


@pytest.mark.parametrize("h,w,k,strides,padding", CASES)
def test_depthwise_value_and_gradients_match_xla(h, w, k, strides, padding):
    assert jax.default_backend() == "cpu"  # where the shifted-sum path runs
    rng = np.random.default_rng(k * 100 + h)
    batch = 12 if strides == 1 else 10  # folded in 6 and 5 interleaved slices
    x = jnp.asarray(rng.standard_normal((batch, h, w, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 4, 1)), jnp.float32)
    ours = layers.depthwise_conv2d(x, kernel, strides, padding)
    ref = xla_depthwise(x, kernel, strides, padding)
    assert ours.shape == ref.shape and relative(ours, ref) < 1e-6
    got = jax.grad(loss(layers.depthwise_conv2d, strides, padding), (0, 1))(x, kernel)
    want = jax.grad(loss(xla_depthwise, strides, padding), (0, 1))(x, kernel)
    for g, r in zip(got, want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


@pytest.mark.usefixtures("without_onednn")
@pytest.mark.parametrize("h,w,k,strides,padding,cout", DENSE)
def test_dense_value_and_gradients_match_xla(h, w, k, strides, padding, cout):
    rng = np.random.default_rng(k * 100 + h)
    cin = layers._MATMUL_GRADIENT_MIN_CHANNELS  # the fewest that take the matmul gradient
    x = jnp.asarray(rng.standard_normal((3, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    assert "custom_vjp" in str(jax.make_jaxpr(layers.conv2d, static_argnums=(2, 3))(
        x, kernel, strides, padding))
    assert relative(layers.conv2d(x, kernel, strides, padding),
                    xla_conv(x, kernel, strides, padding)) == 0  # the forward is XLA's own
    got = jax.grad(loss(layers.conv2d, strides, padding), (0, 1))(x, kernel)
    want = jax.grad(loss(xla_conv, strides, padding), (0, 1))(x, kernel)
    for g, r in zip(got, want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


@pytest.mark.parametrize("conv,reference,kernel_shape,with_onednn", [
    (layers.depthwise_conv2d, xla_depthwise, (3, 3, 3, 1), False),
    (layers.conv2d, xla_conv, (3, 3, layers._MATMUL_GRADIENT_MIN_CHANNELS, 5), False),
    (layers.conv2d, xla_conv, (3, 3, 4, 5), True)])
def test_kernel_gradient_sums_over_devices(conv, reference, kernel_shape, with_onednn, request):
    """Inside shard_map the replicated kernel's gradient is the sum of every device's share,
    as JAX gives it for its own convolution (oneDNN's runs on every device at once)."""
    if with_onednn and not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    if not with_onednn:
        request.getfixturevalue("without_onednn")
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2 * jax.device_count(), 9, 9, kernel_shape[2])),
                    jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)

    def grads(conv):
        per_device = jax.grad(loss(conv, 2, "SAME"), 1)
        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P()),
                                out_specs=P())
        return jax.jit(sharded)(jax.device_put(x, jax.NamedSharding(mesh, P("batch"))), kernel)

    whole = jax.grad(loss(reference, 2, "SAME"), 1)(x, kernel)
    assert relative(grads(conv), whole) < 1e-5
    assert relative(grads(reference), whole) < 1e-5


@pytest.mark.usefixtures("without_onednn")
@pytest.mark.parametrize("strides", [1, 2])
def test_pointwise_value_and_gradients_match_xla(strides):
    """1x1 convolutions run as 2-D matmuls over the pixels, gradients included: the 4-D
    contraction made XLA's CPU transpose the output gradient first."""
    rng = np.random.default_rng(strides)
    x = jnp.asarray(rng.standard_normal((3, 9, 8, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 6, 5)), jnp.float32)
    assert relative(layers.conv2d(x, kernel, strides, "VALID"),
                    xla_conv(x, kernel, strides, "VALID")) < 1e-6
    grad = jax.grad(loss(layers.conv2d, strides, "VALID"), (0, 1))
    dots = [e for e in jax.make_jaxpr(grad)(x, kernel).eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3 and all(v.aval.ndim == 2 for e in dots for v in e.invars)
    want = jax.grad(loss(xla_conv, strides, "VALID"), (0, 1))(x, kernel)
    for g, r in zip(grad(x, kernel), want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


@pytest.mark.usefixtures("without_onednn")
@pytest.mark.parametrize("cin,strides,custom", [(3, 1, False), (3, 2, True)])
def test_dense_gradient_path_choice(cin, strides, custom):
    """Few input channels keep XLA's kernel gradient, unless the kernel is strided (from
    ``_MATMUL_GRADIENT_MIN_CHANNELS`` on, the test above checks the matmul path)."""
    rng = np.random.default_rng(cin)
    x = jnp.asarray(rng.standard_normal((4, 12, 12, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, cin, 4)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(layers.conv2d, static_argnums=(2, 3))(x, kernel, strides, "SAME"))
    assert ("custom_vjp" in jaxpr) == custom
    got = jax.grad(loss(layers.conv2d, strides, "SAME"), (0, 1))(x, kernel)
    want = jax.grad(loss(xla_conv, strides, "SAME"), (0, 1))(x, kernel)
    for g, r in zip(got, want):
        assert relative(g, r) < 1e-5
