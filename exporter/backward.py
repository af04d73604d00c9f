"""An explicit registry of per-layer backward rules, run over the recorded graph.

Grad-CAM needs dS_c/dA, the gradient of a class score with respect to the CAM tensor A.
A gradient traced by tf.GradientTape contains ops tf2onnx cannot convert (ReluGrad,
MaxPoolGrad, BroadcastGradientArgs, ...), so the exporter writes the backward pass
itself, one rule per layer kind, out of ordinary forward ops that tf2onnx converts
(MatMul, Mul, Conv2DBackpropInput, depthwise convolution, Pad, ArgMax, OneHot...).

Every rule takes the recorded forward call and the upstream gradient ``g`` of shape
``(N, T, *output.shape[1:])`` (T target classes per image, all at once: the backward
pass is linear in its seed) and returns the gradient of each of the call's input
tensors, shaped ``(N, T, *input.shape[1:])`` (one tensor for a single-input layer, a
list for merge layers and raw operations).  :func:`backward` walks the graph from the
scores back to A: branches and skip connections (Add, Concatenate, Multiply) sum
their contributions.  Layers with no rule are collected and reported together
(:class:`UnsupportedHead`).

Weights are read from the layers' variables, never copied into new constants, so the
converted graph holds each weight once however many rules use it.

The tests check every rule against tf.GradientTape on trained and keras.applications
models, and every activation derivative against GradientTape elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .activations import activation_grad, activation_name
from .errors import UnsupportedHead
from .trace import IDENTITY_KINDS, OP_PREFIX, Call, Trace, flat

Rule = Callable[[Any, Call, Any], Any]
RULES: dict[str, Rule] = {}


def rule(*kinds: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for k in kinds:
            RULES[k] = fn
        return fn

    return register


def first_input(call: Call) -> Any:
    x = call.inputs
    return x[0] if isinstance(x, (list, tuple)) else x


class Ops:
    """The ``tf`` module as the rules see it, plus ``nt``: the dynamic (N, T) of the
    walk, taken once from the targets.  Shapes are never read back from reshaped
    gradients: tf2onnx's reshape merging miscomputes ``Shape(Reshape(x))``."""

    def __init__(self, tf: Any, nt: Any):
        self.tf = tf
        self.nt = nt

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tf, name)


def nt_shape(tf: Any, g: Any, tail: Any) -> Any:
    """Dynamic (N, T, *tail) shape."""
    nt = tf.nt if isinstance(tf, Ops) else tf.shape(g)[:2]
    return tf.concat([nt, tf.constant([int(d) for d in tail], dtype=tf.int32)], axis=0)


def merge_nt(tf: Any, g: Any) -> tuple[Any, Any]:
    """(N, T, *rest) -> (N*T, *rest) and the (N, T) to split back."""
    nt = tf.nt if isinstance(tf, Ops) else tf.shape(g)[:2]
    rest = [int(d) for d in g.shape[2:]]
    return tf.reshape(g, tf.concat([[-1], tf.constant(rest, tf.int32)], 0)), nt


def split_nt(tf: Any, g: Any, nt: Any) -> Any:
    rest = [int(d) for d in g.shape[1:]]
    return tf.reshape(g, tf.concat([nt, tf.constant(rest, tf.int32)], 0))


def var(tf: Any, v: Any) -> Any:
    """A layer's variable as a tensor (Keras 3 and tf_keras alike), never a copy."""
    return tf.convert_to_tensor(v)


def matmul_t(tf: Any, g: Any, kernel: Any) -> Any:
    """g (N, T, ..., d) @ kernel(k, d)^T -> (N, T, ..., k), computed as
    (kernel @ g^T)^T: transposing the gradient, never the kernel, so tf2onnx folds no
    transposed copy of a large weight."""
    d = int(g.shape[-1])
    g2 = tf.reshape(g, [-1, d])
    out = tf.transpose(tf.matmul(kernel, g2, transpose_b=True))
    return tf.reshape(out, nt_shape(tf, g, [*g.shape[2:-1], int(kernel.shape[0])]))


# --- simple layers -----------------------------------------------------------------


@rule(*IDENTITY_KINDS)
def _identity(tf: Any, call: Call, g: Any) -> Any:
    return g


@rule("Flatten", "Reshape")
def _reshape(tf: Any, call: Call, g: Any) -> Any:
    return tf.reshape(g, nt_shape(tf, g, first_input(call).shape[1:]))


def layer_z(tf: Any, call: Call, linear: Callable[[Any], Any]) -> Callable[[], Any]:
    """The pre-activation of a layer with a built-in activation, recomputed lazily."""
    memo: list[Any] = []

    def z() -> Any:
        if not memo:
            out = linear(first_input(call))
            if getattr(call.layer, "use_bias", False):
                out = out + var(tf, call.layer.bias)
            memo.append(out)
        return memo[0]

    return z


@rule("Dense")
def _dense(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    kernel = var(tf, layer.kernel)
    act = activation_name(layer.activation)
    if act != "linear":
        z = layer_z(tf, call, lambda x: tf.tensordot(x, kernel, 1))
        g = activation_grad(tf, act, z, call.output, g)
    return matmul_t(tf, g, kernel)


@rule("Activation")
def _activation(tf: Any, call: Call, g: Any) -> Any:
    return activation_grad(
        tf, activation_name(call.layer.activation), first_input(call), call.output, g
    )


def config(call: Call) -> dict[str, Any]:
    return dict(call.layer.get_config())


@rule("ReLU")
def _relu(tf: Any, call: Call, g: Any) -> Any:
    cfg = config(call)
    top = cfg.get("max_value")
    slope = float(cfg.get("negative_slope") or 0.0)
    threshold = float(cfg.get("threshold") or 0.0)
    z = tf.expand_dims(first_input(call), 1)
    on = z > threshold
    if top is not None:
        on = on & (z < float(top))
    d = tf.cast(on, g.dtype)
    if slope:
        d = d + slope * tf.cast(z <= threshold, g.dtype)
    return g * d


@rule("LeakyReLU")
def _leaky(tf: Any, call: Call, g: Any) -> Any:
    cfg = config(call)
    slope = float(cfg.get("negative_slope", cfg.get("alpha", 0.3)))
    z = tf.expand_dims(first_input(call), 1)
    return g * tf.where(z > 0, 1.0, slope)


@rule("ELU")
def _elu(tf: Any, call: Call, g: Any) -> Any:
    alpha = float(config(call).get("alpha", 1.0))
    z = tf.expand_dims(first_input(call), 1)
    return g * tf.where(z > 0, 1.0, alpha * tf.exp(tf.minimum(z, 0.0)))


@rule("PReLU")
def _prelu(tf: Any, call: Call, g: Any) -> Any:
    z = tf.expand_dims(first_input(call), 1)
    return g * tf.where(z > 0, 1.0, var(tf, call.layer.alpha))


@rule("Softmax")
def _softmax(tf: Any, call: Call, g: Any) -> Any:
    axis = config(call).get("axis", -1)
    if axis not in (-1, [-1], len(first_input(call).shape) - 1):
        raise UnsupportedHead([f"{call.name} (Softmax over axis {axis})"])
    return activation_grad(tf, "softmax", first_input(call), call.output, g)


def _last_axis(call: Call, axis: Any) -> bool:
    rank = len(first_input(call).shape)
    if isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    return axis in (-1, rank - 1)


@rule("BatchNormalization")
def _batchnorm(tf: Any, call: Call, g: Any) -> Any:
    cfg = config(call)
    if not _last_axis(call, cfg.get("axis", -1)):
        raise UnsupportedHead([f"{call.name} (BatchNormalization over axis {cfg.get('axis')})"])
    var_ = _find(call.named, "moving_variance")
    gamma = _find(call.named, "gamma") if cfg.get("scale", True) else 1.0
    factor = gamma / (var_ + cfg.get("epsilon", 1e-3)) ** 0.5
    return g * tf.constant(np.asarray(factor, np.float32), dtype=g.dtype)


@rule("LayerNormalization")
def _layernorm(tf: Any, call: Call, g: Any) -> Any:
    """y = gamma * (x - mu) / sigma + beta over the last axis:
    dx = (gx - mean(gx) - xhat * mean(gx * xhat)) / sigma, gx = g * gamma."""
    cfg = config(call)
    if not _last_axis(call, cfg.get("axis", -1)) or cfg.get("rms_scaling"):
        raise UnsupportedHead([f"{call.name} (LayerNormalization not over the last axis)"])
    x = tf.expand_dims(first_input(call), 1)
    mu = tf.reduce_mean(x, axis=-1, keepdims=True)
    var_ = tf.reduce_mean(tf.square(x - mu), axis=-1, keepdims=True)
    inv = tf.math.rsqrt(var_ + float(cfg.get("epsilon", 1e-3)))
    xhat = (x - mu) * inv
    gx = g * var(tf, call.layer.gamma) if cfg.get("scale", True) else g
    mean_gx = tf.reduce_mean(gx, axis=-1, keepdims=True)
    mean_gxx = tf.reduce_mean(gx * xhat, axis=-1, keepdims=True)
    return (gx - mean_gx - xhat * mean_gxx) * inv


@rule("LayerScale")
def _layerscale(tf: Any, call: Call, g: Any) -> Any:
    return g * var(tf, call.layer.gamma)


@rule("Rescaling")
def _rescaling(tf: Any, call: Call, g: Any) -> Any:
    scale = np.asarray(config(call).get("scale", 1.0), np.float32)
    return g * tf.constant(scale)


def _find(weights: dict[str, Any], key: str) -> Any:
    for k, v in weights.items():
        if key in k:
            return v
    raise KeyError(key)


# --- merges and raw operations ---------------------------------------------------


def _unbroadcast(tf: Any, grad: Any, like: Any) -> Any:
    """Sum grad (N, T, ...) over the axes where ``like`` (N, ...) was broadcast."""
    shape: list[int | None] = [int(d) if d is not None else None for d in like.shape[1:]]
    out: list[int | None] = [int(d) if d is not None else None for d in grad.shape[2:]]
    if len(shape) < len(out):
        shape = [*([1] * (len(out) - len(shape))), *shape]
    axes = [i + 2 for i, (a, b) in enumerate(zip(shape, out, strict=True)) if a == 1 and b != 1]
    if axes:
        grad = tf.reduce_sum(grad, axis=axes, keepdims=True)
    return tf.reshape(grad, nt_shape(tf, grad, [d or 1 for d in like.shape[1:]]))


def _t1(tf: Any, v: Any) -> Any:
    """A forward operand broadcast against (N, T, ...): batch tensors get the T axis."""
    if hasattr(v, "shape") and len(v.shape) >= 1 and not isinstance(v, (float, int)):
        return tf.expand_dims(v, 1) if len(v.shape) >= 2 else v
    return v


@rule("Add")
def _add(tf: Any, call: Call, g: Any) -> list[Any]:
    return [_unbroadcast(tf, g, t) for t in call.input_tensors]


@rule("Average")
def _average(tf: Any, call: Call, g: Any) -> list[Any]:
    ts = call.input_tensors
    return [_unbroadcast(tf, g / float(len(ts)), t) for t in ts]


@rule("Subtract")
def _subtract(tf: Any, call: Call, g: Any) -> list[Any]:
    a, b = call.input_tensors
    return [_unbroadcast(tf, g, a), _unbroadcast(tf, -g, b)]


@rule("Multiply")
def _multiply(tf: Any, call: Call, g: Any) -> list[Any]:
    ts = call.input_tensors
    out = []
    for i, t in enumerate(ts):
        others = g
        for j, o in enumerate(ts):
            if j != i:
                others = others * _t1(tf, o)
        out.append(_unbroadcast(tf, others, t))
    return out


@rule("Concatenate")
def _concatenate(tf: Any, call: Call, g: Any) -> list[Any]:
    ts = call.input_tensors
    axis = int(config(call).get("axis", -1))
    axis = axis + 1 if axis >= 0 else axis  # (N, ...) -> (N, T, ...)
    sizes = [int(t.shape[axis - 1 if axis > 0 else axis]) for t in ts]
    return list(tf.split(g, sizes, axis=axis))


def _op_binary(kind: str) -> Rule:
    def fn(tf: Any, call: Call, g: Any) -> list[Any]:
        a, b = call.args[0], call.args[1]
        grads: list[Any] = []
        for i, v in enumerate((a, b)):
            if not flat(v):
                continue  # a Python number or other constant
            other = _t1(tf, b if i == 0 else a)
            if kind == "Add":
                d = g
            elif kind == "Subtract":
                d = g if i == 0 else -g
            elif kind == "Multiply":
                d = g * other
            elif i == 0:  # Divide: d(a/b)/da = 1/b
                d = g / other
            else:  # d(a/b)/db = -a/b^2
                d = -g * _t1(tf, a) / (_t1(tf, b) * _t1(tf, b))
            grads.append(_unbroadcast(tf, d, v))
        return grads

    return fn


for _k in ("Add", "Subtract", "Multiply", "Divide", "TrueDivide"):
    RULES[OP_PREFIX + _k] = _op_binary("Divide" if _k == "TrueDivide" else _k)


# --- the walk ----------------------------------------------------------------------


def path_calls(trace: Trace, a: Any, end: Any) -> list[int]:
    """Indices of the calls on some path from tensor ``a`` to tensor ``end``."""
    if end is a:
        return []
    down = trace.descendants(a)
    need = {id(end)}
    on = []
    for i in reversed(down):
        c = trace.calls[i]
        if any(id(t) in need for t in flat(c.output)):
            on.append(i)
            need.update(id(t) for t in c.input_tensors)
    return sorted(on)


def check_path(trace: Trace, a: Any, end: Any) -> list[str]:
    """Every layer between ``a`` and ``end`` without a rule (empty when all are covered)."""
    idx = path_calls(trace, a, end)
    if end is not a and not idx:
        return ["the class scores do not depend on the CAM tensor"]
    problems = []
    for i in idx:
        c = trace.calls[i]
        if c.kind not in RULES:
            problems.append(f"{c.name} ({c.kind})")
    return problems


def backward(tf: Any, trace: Trace, a: Any, end: Any, g: Any, nt: Any) -> Any:
    """d/dA from g = dL/d(end) (N, T, *end.shape[1:]), over every path from A to end;
    ``nt`` is the dynamic (N, T)."""
    tf = Ops(tf, nt)
    problems = check_path(trace, a, end)
    if problems:
        raise UnsupportedHead(problems)
    idx = path_calls(trace, a, end)
    on_path = {id(a)}
    for i in idx:
        on_path.update(id(t) for t in flat(trace.calls[i].output))
    grads: dict[int, Any] = {id(end): g}
    for i in reversed(idx):
        c = trace.calls[i]
        outs = flat(c.output)
        gout = grads.pop(id(outs[0]), None) if len(outs) == 1 else None
        if gout is None:
            continue
        result = RULES[c.kind](tf, c, gout)
        tensor_args = c.input_tensors
        got = result if isinstance(result, list) else [result]
        if c.kind.startswith(OP_PREFIX):  # grads only for the tensor operands, in order
            tensor_args = [t for v in c.args[:2] for t in flat(v)]
        for t, gt in zip(tensor_args, got, strict=True):
            if id(t) in on_path:
                grads[id(t)] = grads[id(t)] + gt if id(t) in grads else gt
    if id(a) not in grads:
        raise UnsupportedHead(["no gradient reached the CAM tensor"])
    return grads[id(a)]


from . import rules_spatial  # noqa: E402, F401  (registers the spatial rules)
