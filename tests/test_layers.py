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

from fracture_jax import kernels
from fracture_jax.kernels import conv, ffi, native, onednn, winograd
from fracture_jax.models import layers

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


def choose_path(with_onednn: bool, request):
    """oneDNN's path (skipped where its library is missing), or XLA's."""
    if with_onednn and not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    if not with_onednn:
        request.getfixturevalue("without_onednn")


def sharded_over_batch(per_device, x, *replicated):
    """``per_device`` inside shard_map over every device: ``x`` split along the batch, the rest
    replicated, the results replicated."""
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    specs = (P("batch"),) + (P(),) * len(replicated)
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P())
    return jax.jit(sharded)(jax.device_put(x, jax.NamedSharding(mesh, P("batch"))), *replicated)


def test_onednn_loads_where_its_wheel_exists():
    """requirements.txt installs oneDNN's library on x86-64 Linux; elsewhere XLA's paths run."""
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert onednn.available()
    code = "from fracture_jax.kernels import onednn; print(onednn.available())"
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
    grad = jax.jit(jax.grad(loss(kernels.conv2d, strides, padding), (0, 1)))
    calls = str(jax.make_jaxpr(grad)(x, kernel)).count("ffi_call")
    assert calls == (1 if k == 1 else 3)  # a 1x1 kernel's gradients are matmuls
    assert relative(jax.jit(kernels.conv2d, static_argnums=(2, 3))(x, kernel, strides, padding),
                    xla_conv(x, kernel, strides, padding)) < 1e-6
    want = jax.grad(loss(xla_conv, strides, padding), (0, 1))(x, kernel)
    for g, r in zip(grad(x, kernel), want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


def test_native_kernel_failure_reaches_the_caller():
    """A failing step's message is raised by XLA, not swallowed: oneDNN's status, a buffer the
    call does not have, a plan number that does not exist."""
    if not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    run = jax.jit(lambda x, plan: ffi.call(plan, (2,), x), static_argnums=1)
    bad_primitive = ffi.Plan()
    bad_primitive.onednn(None, {onednn.DNNL_ARG_SRC: (None, (ffi.ARGUMENT, 0))})
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="native kernel: oneDNN execute failed with status 2"):
        jax.block_until_ready(run(jnp.ones(2), bad_primitive.number))
    no_such_buffer = ffi.Plan()
    no_such_buffer.onednn(None, {onednn.DNNL_ARG_SRC: (None, (ffi.ARGUMENT, 3))})
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="a step names argument 3, which this call does not have"):
        jax.block_until_ready(run(jnp.ones(2), no_such_buffer.number))
    with pytest.raises(jax.errors.JaxRuntimeError, match="no plan number 1000000000"):
        jax.block_until_ready(run(jnp.ones(2), 10**9))


@pytest.mark.parametrize("with_onednn", [True, False])
@pytest.mark.parametrize("h,w,k,strides,padding", CASES)
def test_depthwise_value_and_gradients_match_xla(h, w, k, strides, padding, with_onednn,
                                                 request):
    """oneDNN's depthwise convolution, and the shifted sums where its library is missing."""
    assert jax.default_backend() == "cpu"  # where both CPU paths run
    choose_path(with_onednn, request)
    rng = np.random.default_rng(k * 100 + h)
    batch = 12 if strides == 1 else 10  # folded in 6 and 5 interleaved slices
    x = jnp.asarray(rng.standard_normal((batch, h, w, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 4, 1)), jnp.float32)
    ours = kernels.depthwise_conv2d(x, kernel, strides, padding)
    ref = xla_depthwise(x, kernel, strides, padding)
    assert ours.shape == ref.shape and relative(ours, ref) < 1e-6
    got = jax.grad(loss(kernels.depthwise_conv2d, strides, padding), (0, 1))(x, kernel)
    want = jax.grad(loss(xla_depthwise, strides, padding), (0, 1))(x, kernel)
    for g, r in zip(got, want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


@pytest.mark.usefixtures("without_onednn")
@pytest.mark.parametrize("h,w,k,strides,padding,cout", DENSE)
def test_dense_value_and_gradients_match_xla(h, w, k, strides, padding, cout):
    rng = np.random.default_rng(k * 100 + h)
    cin = conv.MATMUL_GRADIENT_MIN_CHANNELS  # the fewest that take the matmul gradient
    x = jnp.asarray(rng.standard_normal((3, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    assert "custom_vjp" in str(jax.make_jaxpr(kernels.conv2d, static_argnums=(2, 3))(
        x, kernel, strides, padding))
    assert relative(kernels.conv2d(x, kernel, strides, padding),
                    xla_conv(x, kernel, strides, padding)) == 0  # the forward is XLA's own
    got = jax.grad(loss(kernels.conv2d, strides, padding), (0, 1))(x, kernel)
    want = jax.grad(loss(xla_conv, strides, padding), (0, 1))(x, kernel)
    for g, r in zip(got, want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


@pytest.mark.parametrize("conv,reference,kernel_shape,with_onednn", [
    (kernels.depthwise_conv2d, xla_depthwise, (3, 3, 3, 1), False),
    (kernels.depthwise_conv2d, xla_depthwise, (3, 3, 3, 1), True),
    (kernels.conv2d, xla_conv, (3, 3, conv.MATMUL_GRADIENT_MIN_CHANNELS, 5), False),
    (kernels.conv2d, xla_conv, (3, 3, 4, 5), True)])
def test_kernel_gradient_sums_over_devices(conv, reference, kernel_shape, with_onednn, request):
    """Inside shard_map the replicated kernel's gradient is the sum of every device's share,
    as JAX gives it for its own convolution (oneDNN's runs on every device at once)."""
    choose_path(with_onednn, request)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2 * jax.device_count(), 9, 9, kernel_shape[2])),
                    jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    whole = jax.grad(loss(reference, 2, "SAME"), 1)(x, kernel)
    for f in (conv, reference):
        assert relative(sharded_over_batch(jax.grad(loss(f, 2, "SAME"), 1), x, kernel),
                        whole) < 1e-5


@pytest.mark.usefixtures("without_onednn")
@pytest.mark.parametrize("strides", [1, 2])
def test_pointwise_value_and_gradients_match_xla(strides):
    """1x1 convolutions run as 2-D matmuls over the pixels, gradients included: the 4-D
    contraction made XLA's CPU transpose the output gradient first."""
    rng = np.random.default_rng(strides)
    x = jnp.asarray(rng.standard_normal((3, 9, 8, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 6, 5)), jnp.float32)
    assert relative(kernels.conv2d(x, kernel, strides, "VALID"),
                    xla_conv(x, kernel, strides, "VALID")) < 1e-6
    grad = jax.grad(loss(kernels.conv2d, strides, "VALID"), (0, 1))
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
    jaxpr = str(jax.make_jaxpr(kernels.conv2d, static_argnums=(2, 3))(x, kernel, strides, "SAME"))
    assert ("custom_vjp" in jaxpr) == custom
    got = jax.grad(loss(kernels.conv2d, strides, "SAME"), (0, 1))(x, kernel)
    want = jax.grad(loss(xla_conv, strides, "SAME"), (0, 1))(x, kernel)
    for g, r in zip(got, want):
        assert relative(g, r) < 1e-5


def epilogue_operands(rng, out_shape):
    """A bias, an inference BatchNorm's scale and shift, and a residual for ``out_shape``."""
    c = out_shape[-1]
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (c, c, c, out_shape))


def epilogue(bias, scale, shift, residual):
    return (("add", bias), ("mul", scale), ("add", shift), ("add", residual), ("relu", None))


@pytest.mark.parametrize("k,strides,depthwise,activation", [
    (3, 1, False, "relu"), (3, 2, False, "relu"), (1, 1, False, "relu"), (1, 1, False, "swish"),
    (3, 1, True, "swish"), (5, 2, True, "swish"), (3, 2, True, "relu")])
def test_onednn_epilogue_matches_xla_with_gradients(k, strides, depthwise, activation):
    """A bias, a BatchNorm's affine, a residual and an activation run inside oneDNN's call
    (one custom call, no separate pass), after a dense or a depthwise convolution; value and
    every gradient match the operations one by one."""
    if not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    rng = np.random.default_rng(k + strides)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 6, 1 if depthwise else 5)) * 0.3,
                         jnp.float32)
    ours, theirs = ((kernels.depthwise_conv2d, xla_depthwise) if depthwise
                    else (kernels.conv2d, xla_conv))
    operands = epilogue_operands(rng, theirs(x, kernel, strides, "SAME").shape)

    def fused(x, kernel, *operands):
        return ours(x, kernel, strides, "SAME", epilogue(*operands)[:-1] + ((activation, None),))

    def reference(x, kernel, bias, scale, shift, residual):
        act = jax.nn.relu if activation == "relu" else jax.nn.silu
        return act((theirs(x, kernel, strides, "SAME") + bias) * scale + shift + residual)

    jaxpr = jax.make_jaxpr(fused)(x, kernel, *operands)
    assert [e.primitive.name for e in jaxpr.eqns] == ["custom_vjp_call"]
    assert str(jaxpr).count("ffi_call") == 1 and "max" not in str(jaxpr)
    assert relative(jax.jit(fused)(x, kernel, *operands), reference(x, kernel, *operands)) < 1e-6
    positions = tuple(range(6))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fused(*a))), positions))(x, kernel,
                                                                                *operands)
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), positions)(x, kernel, *operands)
    for g, r in zip(got, want):
        assert g.shape == r.shape and relative(g, r) < 1e-5


@pytest.mark.parametrize("with_onednn", [True, False])
def test_epilogue_gradients_sum_over_devices(with_onednn, request):
    """The bias's and the BatchNorm's per-channel gradients sum over the devices too."""
    choose_path(with_onednn, request)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2 * jax.device_count(), 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)) * 0.3, jnp.float32)
    bias, scale, shift, _ = epilogue_operands(rng, (1, 9, 9, 5))

    def loss(x, kernel, bias, scale, shift):
        steps = (("add", bias), ("mul", scale), ("add", shift), ("relu", None))
        return jnp.sum(jnp.sin(kernels.conv2d(x, kernel, 1, "SAME", steps)))

    got = sharded_over_batch(jax.grad(loss, (1, 2, 3, 4)), x, kernel, bias, scale, shift)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn, "available", lambda: False)
        want = jax.grad(loss, (1, 2, 3, 4))(x, kernel, bias, scale, shift)
    for g, r in zip(got, want):
        assert relative(g, r) < 1e-5


@pytest.mark.parametrize("steps", [(("relu", None), ("add", 1.0)),
                                   (("swish", None), ("relu", None)), (("tanh", None),)])
def test_epilogue_refuses_other_steps(steps):
    """An activation only last (its gradient comes from the output or the values before it),
    and only these steps."""
    x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match="can end in a ReLU or a swish"):
        kernels.conv2d(x, kernel, 1, "VALID", steps)


def test_relu_gradient_matches_jax():
    """The ReLU's gradient, masked by its output, is JAX's own, bit for bit (zeros included)."""
    x = jnp.asarray([-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-30, 7.5], jnp.float32)
    ours = jax.grad(lambda x: jnp.sum(jnp.sin(3 * layers.relu(x))))(x)
    theirs = jax.grad(lambda x: jnp.sum(jnp.sin(3 * jax.nn.relu(x))))(x)
    assert (layers.relu(x) == jax.nn.relu(x)).all() and (ours == theirs).all()
    assert (ours[jnp.array([0, 1, 2, 5])] == 0).all() and (ours[jnp.array([3, 4, 6])] != 0).all()


class ConvBN(layers.nn.Module):
    residual: bool = False

    @layers.nn.compact
    def __call__(self, x, train: bool = False):
        conv = layers.Conv2D(5, 3, padding="SAME", name="conv")
        bn = layers.BatchNormalization(name="bn")
        return layers.conv_bn(conv, bn, x, train, residual=x[..., :1] if self.residual else None,
                              activation="relu")


@pytest.mark.parametrize("residual", [False, True])
def test_conv_bn_folds_inference_batchnorm(residual):
    """In inference mode the BatchNorm's affine runs in the convolution's epilogue and gives
    the result of the layers one after the other; in training mode it uses batch moments."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    module = ConvBN(residual)
    variables = module.init(jax.random.key(0), x)
    stats = {k: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)
             for k, v in variables["batch_stats"]["bn"].items()}
    params = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), jnp.float32),
                          variables["params"])
    variables = {"params": params, "batch_stats": {"bn": stats}}

    def one_by_one(v, x):
        conv = layers.Conv2D(5, 3, padding="SAME").apply({"params": v["params"]["conv"]}, x)
        y = layers.BatchNormalization().apply({"params": v["params"]["bn"],
                                               "batch_stats": v["batch_stats"]["bn"]}, conv)
        return jax.nn.relu(y + x[..., :1] if residual else y)

    assert relative(jax.jit(module.apply)(variables, x), one_by_one(variables, x)) < 1e-6
    train, _ = module.apply(variables, x, True, mutable=["batch_stats"])
    moments = jax.nn.relu(jax.nn.standardize(
        layers.Conv2D(5, 3, padding="SAME").apply({"params": params["conv"]}, x),
        axis=(0, 1, 2), epsilon=1e-3) * params["bn"]["gamma"] + params["bn"]["beta"]
        + (x[..., :1] if residual else 0.0))
    assert relative(train, moments) < 1e-5


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 9, 7, 4), (1, 65, 65, 2)])
def test_tiled_max_pool_matches_reduce_window(shape):
    """VGG16's 2x2 pools: value, and the gradient to each window's first maximum, exactly as
    XLA's reduce_window and select_and_scatter give them (ties included)."""
    rng = np.random.default_rng(shape[1])
    x = jnp.asarray(rng.integers(0, 3, shape), jnp.float32)  # many ties
    reference = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                            "VALID")
    want, want_vjp = jax.vjp(reference, x)
    got, got_vjp = jax.vjp(jax.jit(lambda x: layers.max_pool(x, 2, 2)), x)
    dy = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    assert "reduce_window" not in str(jax.make_jaxpr(lambda x: layers.max_pool(x, 2, 2))(x))
    assert (got == want).all() and (got_vjp(dy)[0] == want_vjp(dy)[0]).all()


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (1, 2)])
def test_winograd_value_and_input_gradient_match_xla(h, w):
    """F(2x2, 3x3) on even and odd sides (the last tile cut off): the value, and the input
    gradient as a convolution by the turned, transposed kernel."""
    rng = np.random.default_rng(h * w)
    x = jnp.asarray(rng.standard_normal((2, h, w, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)
    assert relative(jax.jit(winograd.conv3x3)(x, kernel), xla_conv(x, kernel, 1, "SAME")) < 1e-6
    dy = jnp.asarray(rng.standard_normal((2, h, w, 4)), jnp.float32)
    _, vjp = jax.vjp(lambda x: xla_conv(x, kernel, 1, "SAME"), x)
    assert relative(jax.jit(winograd.input_gradient)(dy, kernel), vjp(dy)[0]) < 1e-6


def test_winograd_takes_the_layers_with_many_channels_and_tiles():
    """VGG16's blocks 2-5 at 260 px (batch 32; batch 8 without block 5) in either direction,
    and ResNet50's 33x33 and 17x17 layers; not 64-channel layers, 9x9 ones, strided or
    unpadded layers."""
    same = ((1, 1), (1, 1))
    for x_shape, kernel_shape in [((32, 130, 130, 128), (3, 3, 128, 128)),
                                  ((32, 65, 65, 128), (3, 3, 128, 256)),
                                  ((32, 65, 65, 256), (3, 3, 256, 128)),  # an input gradient
                                  ((8, 65, 65, 256), (3, 3, 256, 256)),
                                  ((8, 32, 32, 512), (3, 3, 512, 512)),
                                  ((32, 16, 16, 512), (3, 3, 512, 512)),
                                  ((32, 33, 33, 128), (3, 3, 128, 128)),
                                  ((32, 17, 17, 256), (3, 3, 256, 256))]:
        assert winograd.pays(x_shape, kernel_shape, 1, same), (x_shape, kernel_shape)
    for x_shape, kernel_shape in [((32, 260, 260, 64), (3, 3, 64, 64)),
                                  ((32, 130, 130, 64), (3, 3, 64, 128)),
                                  ((8, 16, 16, 512), (3, 3, 512, 512)),
                                  ((32, 9, 9, 512), (3, 3, 512, 512))]:
        assert not winograd.pays(x_shape, kernel_shape, 1, same), (x_shape, kernel_shape)
    assert not winograd.pays((32, 32, 32, 512), (3, 3, 512, 1), 1, same)  # depthwise
    assert not winograd.pays((32, 64, 64, 512), (3, 3, 512, 512), 2, same)
    assert not winograd.pays((32, 64, 64, 512), (3, 3, 512, 512), 1, ((0, 0), (0, 0)))


def test_winograd_layer_in_the_onednn_path_matches_xla():
    """A layer ``winograd.pays`` for, with a bias and a ReLU: Winograd's forward and input
    gradient and oneDNN's kernel gradient (one oneDNN custom call, and the C input transforms
    where they compiled) match XLA's."""
    if not onednn.available():
        pytest.skip("oneDNN's library is installed on x86-64 Linux only")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 63, 128)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 128, 144)) / 34, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(144), jnp.float32)
    assert winograd.pays(x.shape, kernel.shape, 1, ((1, 1), (1, 1)))

    def ours(x, kernel, bias):
        return kernels.conv2d(x, kernel, 1, "SAME", (("add", bias), ("relu", None)))

    def reference(x, kernel, bias):
        return jax.nn.relu(xla_conv(x, kernel, 1, "SAME") + bias)

    grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), (0, 1, 2)))
    transforms = 2 if native.library("winograd") else 0  # forward and input gradient
    assert str(jax.make_jaxpr(grad)(x, kernel, bias)).count("ffi_call") == 1 + transforms
    assert relative(jax.jit(ours)(x, kernel, bias), reference(x, kernel, bias)) < 1e-6
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), (0, 1, 2))(x, kernel, bias)
    for g, r in zip(grad(x, kernel, bias), want):
        assert g.shape == r.shape and relative(g, r) < 1e-5
