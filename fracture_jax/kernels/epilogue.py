"""What follows a convolution in the same kernel call: additions, products and a final
activation (``apply_epilogue``), and their gradients for the convolutions' custom VJPs."""

from typing import Sequence

import jax
import jax.numpy as jnp
Epilogue = Sequence[tuple[str, jax.Array | None]]


@jax.custom_vjp
def relu(x):
    """ReLU with the gradient masked by its output (``y > 0``, the same mask as ``x > 0``): the
    backward pass reads the stored output, where XLA re-derived the input of every ReLU on
    ResNet50's residual stream from the block convolutions before it."""
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_fwd(x):
    y = relu(x)
    return y, y


def _relu_bwd(y, dy):
    return (jnp.where(y > 0, dy, jnp.zeros((), dy.dtype)),)


relu.defvjp(_relu_fwd, _relu_bwd)
swish = jax.nn.silu
ACTIVATIONS = {"relu": relu, "swish": swish}


def apply_epilogue(y, epilogue: Epilogue):
    """``epilogue``'s steps on ``y`` in order: ("add", v), ("mul", v), ("relu" or "swish",
    None)."""
    for op, v in epilogue:
        y = ACTIVATIONS[op](y) if op in ACTIVATIONS else y + v if op == "add" else y * v
    return y


def checked_ops(epilogue: Epilogue, where: str) -> tuple:
    """The epilogue's operation names, refused unless additions and products with at most one
    activation, last."""
    ops = tuple(op for op, _ in epilogue)
    if not set(ops) <= {"add", "mul", *ACTIVATIONS} or set(ops[:-1]) & set(ACTIVATIONS):
        raise ValueError(f"{where}: an epilogue adds, multiplies, and can end in a ReLU or a "
                         f"swish; not {ops}")
    return ops


def epilogue_gradients(ops: tuple, operands: tuple, y, dy, convolution):
    """The gradients of ``apply_epilogue`` with respect to its input and its operands, from
    its output ``y``: a final ReLU's mask is ``y > 0``; a swish's gradient, and a product's
    operand's, need the values before them, recomputed from ``convolution()`` (XLA drops that
    where unused)."""
    arithmetic = [op for op in ops if op not in ACTIVATIONS]
    g = dy
    if ops[-1:] == ("relu",):
        (g,) = _relu_bwd(y, dy)
    elif ops[-1:] == ("swish",):
        before = apply_epilogue(convolution(), tuple(zip(arithmetic, operands)))
        g = jax.vjp(swish, before)[1](dy)[0]
    grads = list(operands)
    for i in reversed(range(len(arithmetic))):
        v = operands[i]
        if arithmetic[i] == "add":
            grads[i] = _sum_to(g, v.shape)
        else:
            before = apply_epilogue(convolution(), tuple(zip(arithmetic[:i], operands[:i])))
            grads[i], g = _sum_to(g * before, v.shape), g * v
    return g, tuple(grads)


def _sum_to(g, shape):
    """``g`` summed down to a per-channel ``shape`` (C,), or ``g`` itself."""
    return g if g.shape == tuple(shape) else jnp.sum(g, axis=(0, 1, 2))
