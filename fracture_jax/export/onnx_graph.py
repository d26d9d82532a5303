"""A JAX function as an ONNX graph, translated from its jaxpr, for serving without JAX.

The function is traced once at a fixed input shape; its closed-over arrays (the weights)
become initializers. Equations whose inputs are all constant are evaluated here (constant
folding), unless that would enlarge the model. Only the primitives the fracture_jax models
use are translated; any other raises ``NotImplementedError`` naming it.
"""

import numpy as np

OPSET = 18


def _onnx():
    import onnx
    return onnx


class _Graph:
    def __init__(self):
        onnx = _onnx()
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.nodes, self.initializers, self.names = [], [], {}
        self.consts = {}  # jaxpr var -> numpy value, for folding
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint="c") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def name_of(self, var) -> str:
        if hasattr(var, "val"):  # a Literal
            return self.const(np.asarray(var.val, dtype=var.aval.dtype), "lit")
        if var in self.names:
            return self.names[var]
        if var in self.consts:
            self.names[var] = self.const(self.consts[var])
            return self.names[var]
        raise KeyError(f"unbound jaxpr variable {var}")


def _value(g: _Graph, var):
    if hasattr(var, "val"):
        return np.asarray(var.val, dtype=var.aval.dtype)
    return g.consts.get(var)


_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
                "min": "Min", "pow": "Pow", "neg": "Neg", "exp": "Exp", "log": "Log",
                "sqrt": "Sqrt", "logistic": "Sigmoid", "tanh": "Tanh", "abs": "Abs",
                "erf": "Erf", "copy": "Identity", "copy_p": "Identity"}
_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint")
_NCHW, _NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _inner_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            inner = eqn.params[key]
            return (inner.jaxpr, inner.consts) if hasattr(inner, "jaxpr") else (inner, ())
    raise NotImplementedError(f"call primitive {eqn.primitive.name} without a jaxpr")


def _conv(g, eqn, x, w):
    p = eqn.params
    dn = p["dimension_numbers"]
    if (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
        raise NotImplementedError(f"convolution layout {dn}: expected NHWC/HWIO")
    if any(d != 1 for d in p["lhs_dilation"]):
        raise NotImplementedError("transposed convolution")
    kernel = _value(g, eqn.invars[1])
    w = (g.const(np.transpose(kernel, (3, 2, 0, 1)), "kernel") if kernel is not None
         else g.node("Transpose", [w], perm=[3, 2, 0, 1]))
    (top, bottom), (left, right) = p["padding"]
    y = g.node("Conv", [g.node("Transpose", [x], perm=_NCHW), w],
               kernel_shape=list(eqn.invars[1].aval.shape[:2]), strides=list(p["window_strides"]),
               dilations=list(p["rhs_dilation"]), pads=[top, left, bottom, right],
               group=p["feature_group_count"])
    return g.node("Transpose", [y], perm=_NHWC)


def _max_pool(g, eqn, x):
    p = eqn.params
    dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if dims[0] != 1 or dims[3] != 1 or strides[0] != 1 or strides[3] != 1:
        raise NotImplementedError("max pooling over batch or channels")
    y = g.node("MaxPool", [g.node("Transpose", [x], perm=_NCHW)], kernel_shape=list(dims[1:3]),
               strides=list(strides[1:3]),
               pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]])
    return g.node("Transpose", [y], perm=_NHWC)


def _dot(g, eqn, a, b):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    rank = len(eqn.invars[0].aval.shape)
    if lb or rb or tuple(lc) != (rank - 1,) or tuple(rc) != (0,) \
            or len(eqn.invars[1].aval.shape) != 2:
        raise NotImplementedError(f"dot_general with dimension numbers {(lc, rc), (lb, rb)}")
    return g.node("MatMul", [a, b])


def _translate(g: _Graph, eqn, ins: list[str]) -> str:
    name, p = eqn.primitive.name, eqn.params
    out_aval = eqn.outvars[0].aval
    if name in _ELEMENTWISE:
        return g.node(_ELEMENTWISE[name], ins)
    if name == "rsqrt":
        return g.node("Reciprocal", [g.node("Sqrt", ins)])
    if name == "integer_pow":
        return g.node("Pow", [ins[0], g.const(np.asarray(p["y"], out_aval.dtype))])
    if name == "square":
        return g.node("Mul", [ins[0], ins[0]])
    if name == "convert_element_type":
        to = _onnx().helper.np_dtype_to_tensor_dtype(np.dtype(p["new_dtype"]))
        return g.node("Cast", ins, to=to)
    if name in ("reshape", "squeeze", "expand_dims"):
        return g.node("Reshape", [ins[0], g.const(np.asarray(out_aval.shape, np.int64))])
    if name == "broadcast_in_dim":
        shape, dims = p["shape"], p["broadcast_dimensions"]
        ones = [1] * len(shape)
        for src, dst in enumerate(dims):
            ones[dst] = eqn.invars[0].aval.shape[src]
        x = g.node("Reshape", [ins[0], g.const(np.asarray(ones, np.int64))])
        return g.node("Expand", [x, g.const(np.asarray(shape, np.int64))])
    if name == "transpose":
        return g.node("Transpose", ins, perm=list(p["permutation"]))
    if name in ("reduce_sum", "reduce_max", "reduce_min"):
        op = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
        return g.node(op[name], [ins[0], g.const(np.asarray(p["axes"], np.int64))], keepdims=0)
    if name == "dot_general":
        return _dot(g, eqn, *ins)
    if name == "conv_general_dilated":
        return _conv(g, eqn, *ins)
    if name == "reduce_window_max":
        return _max_pool(g, eqn, ins[0])
    if name == "pad":
        config = p["padding_config"]
        if any(i != 0 or lo < 0 or hi < 0 for lo, hi, i in config):
            raise NotImplementedError("interior or negative padding")
        pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
        return g.node("Pad", [ins[0], g.const(np.asarray(pads, np.int64)), ins[1]])
    if name == "slice":
        starts, limits = p["start_indices"], p["limit_indices"]
        steps = p["strides"] or [1] * len(starts)
        return g.node("Slice", [ins[0], g.const(np.asarray(starts, np.int64)),
                                g.const(np.asarray(limits, np.int64)),
                                g.const(np.arange(len(starts), dtype=np.int64)),
                                g.const(np.asarray(steps, np.int64))])
    if name == "rev":  # a Slice running backwards along each reversed axis
        axes = np.asarray(p["dimensions"], np.int64)
        big = np.iinfo(np.int64).max
        return g.node("Slice", [ins[0], g.const(np.full(axes.size, -1, np.int64)),
                                g.const(np.full(axes.size, -big, np.int64)), g.const(axes),
                                g.const(np.full(axes.size, -1, np.int64))])
    if name == "concatenate":
        return g.node("Concat", ins, axis=p["dimension"])
    raise NotImplementedError(f"no ONNX translation for the JAX primitive {name!r}")


def _run(g: _Graph, jaxpr, consts, in_names: list[str]) -> list:
    """Translate ``jaxpr`` with inputs bound to ONNX names (or constants); returns outputs as
    names or constant values."""
    for var, value in zip(jaxpr.constvars, consts):
        g.consts[var] = np.asarray(value)
    for var, name in zip(jaxpr.invars, in_names):
        if isinstance(name, np.ndarray):
            g.consts[var] = name
        else:
            g.names[var] = name
    for eqn in jaxpr.eqns:
        values = [_value(g, v) for v in eqn.invars]
        if eqn.primitive.name in _CALLS:
            inner, inner_consts = _inner_jaxpr(eqn)
            args = [v if v is not None else g.name_of(var) for v, var in zip(values, eqn.invars)]
            outs = _run(g, inner, inner_consts, args)
            for var, out in zip(eqn.outvars, outs):
                if isinstance(out, np.ndarray):
                    g.consts[var] = out
                else:
                    g.names[var] = out
            continue
        out_size = int(np.prod(eqn.outvars[0].aval.shape))
        if all(v is not None for v in values) and (
                out_size <= max([v.size for v in values] + [4096])):
            result = eqn.primitive.bind(*values, **eqn.params)
            results = result if eqn.primitive.multiple_results else [result]
            for var, r in zip(eqn.outvars, results):
                g.consts[var] = np.asarray(r)
            continue
        if len(eqn.outvars) != 1:
            raise NotImplementedError(f"multi-output primitive {eqn.primitive.name}")
        g.names[eqn.outvars[0]] = _translate(g, eqn, [g.name_of(v) for v in eqn.invars])
    return [g.consts[v] if v in g.consts else g.name_of(v) for v in jaxpr.outvars]


def to_onnx(fn, example: np.ndarray, input_name: str = "image",
            output_name: str = "probability", doc: str = ""):
    """``fn`` (one array in, one array out) as an ONNX ModelProto for inputs like
    ``example``."""
    import jax
    onnx = _onnx()
    closed = jax.make_jaxpr(fn)(example)
    g = _Graph()
    (out,) = _run(g, closed.jaxpr, closed.consts, [input_name])
    out_aval = closed.jaxpr.outvars[0].aval
    g.nodes.append(g.helper.make_node("Identity", [out], [output_name]))
    dtype = g.helper.np_dtype_to_tensor_dtype
    used = {name for node in g.nodes for name in node.input}
    graph = g.helper.make_graph(
        g.nodes, "fracture_jax", [g.helper.make_tensor_value_info(
            input_name, dtype(np.dtype(example.dtype)), list(example.shape))],
        [g.helper.make_tensor_value_info(output_name, dtype(np.dtype(out_aval.dtype)),
                                         list(out_aval.shape))],
        [t for t in g.initializers if t.name in used])
    model = g.helper.make_model(graph, producer_name="fracture_jax", doc_string=doc,
                                opset_imports=[g.helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model
