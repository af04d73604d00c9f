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

import math
from collections.abc import Callable
from typing import Any

import numpy as np

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


def _x(call: Call) -> Any:
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


def _nt_shape(tf: Any, g: Any, tail: Any) -> Any:
    """Dynamic (N, T, *tail) shape."""
    nt = tf.nt if isinstance(tf, Ops) else tf.shape(g)[:2]
    return tf.concat([nt, tf.constant([int(d) for d in tail], dtype=tf.int32)], axis=0)


def _merge_nt(tf: Any, g: Any) -> tuple[Any, Any]:
    """(N, T, *rest) -> (N*T, *rest) and the (N, T) to split back."""
    nt = tf.nt if isinstance(tf, Ops) else tf.shape(g)[:2]
    rest = [int(d) for d in g.shape[2:]]
    return tf.reshape(g, tf.concat([[-1], tf.constant(rest, tf.int32)], 0)), nt


def _split_nt(tf: Any, g: Any, nt: Any) -> Any:
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
    return tf.reshape(out, _nt_shape(tf, g, [*g.shape[2:-1], int(kernel.shape[0])]))


# --- activations -----------------------------------------------------------------

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _sig(tf: Any, z: Any) -> Any:
    return tf.sigmoid(z)


def _act_derivatives(tf: Any) -> dict[str, Callable[[Callable[[], Any], Any], Any]]:
    """name -> f'(z) from (lazy z, y).  Keras 3 definitions (hard_sigmoid = relu6(x+3)/6)."""
    f32 = tf.float32

    def step(c: Any) -> Any:
        return tf.cast(c, f32)

    def gelu(z: Any) -> Any:
        cdf = 0.5 * (1.0 + tf.math.erf(z * (1.0 / math.sqrt(2.0))))
        return cdf + z * tf.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))

    def hard_sigmoid_d(z: Any) -> Any:
        return step((z > -3.0) & (z < 3.0)) / 6.0

    def mish(z: Any) -> Any:
        t = tf.tanh(tf.nn.softplus(z))
        return t + z * (1.0 - t * t) * tf.sigmoid(z)

    return {
        "relu": lambda z, y: step(y > 0),
        "relu6": lambda z, y: step((z() > 0) & (z() < 6.0)),
        "leaky_relu": lambda z, y: tf.where(z() > 0, 1.0, 0.2),
        "elu": lambda z, y: tf.where(z() > 0, 1.0, y + 1.0),
        "selu": lambda z, y: tf.where(z() > 0, _SELU_SCALE, y + _SELU_SCALE * _SELU_ALPHA),
        "celu": lambda z, y: tf.where(z() > 0, 1.0, tf.exp(tf.minimum(z(), 0.0))),
        "softplus": lambda z, y: tf.sigmoid(z()),
        "softsign": lambda z, y: 1.0 / tf.square(1.0 + tf.abs(z())),
        "silu": lambda z, y: _silu_d(tf, z()),
        "swish": lambda z, y: _silu_d(tf, z()),
        "gelu": lambda z, y: gelu(z()),
        "tanh": lambda z, y: 1.0 - y * y,
        "sigmoid": lambda z, y: y * (1.0 - y),
        "hard_sigmoid": lambda z, y: hard_sigmoid_d(z()),
        "hard_silu": lambda z, y: tf.nn.relu6(z() + 3.0) / 6.0 + z() * hard_sigmoid_d(z()),
        "hard_swish": lambda z, y: tf.nn.relu6(z() + 3.0) / 6.0 + z() * hard_sigmoid_d(z()),
        "hard_tanh": lambda z, y: step((z() > -1.0) & (z() < 1.0)),
        "exponential": lambda z, y: y,
        "mish": lambda z, y: mish(z()),
        "tanh_shrink": lambda z, y: tf.square(tf.tanh(z())),
        "log_sigmoid": lambda z, y: tf.sigmoid(-z()),
    }


def _silu_d(tf: Any, z: Any) -> Any:
    s = tf.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


ELEMENTWISE_ACTIVATIONS = [
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "softplus",
    "softsign",
    "silu",
    "swish",
    "gelu",
    "tanh",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "hard_tanh",
    "exponential",
    "mish",
    "tanh_shrink",
    "log_sigmoid",
]
ACTIVATIONS = ("linear", *ELEMENTWISE_ACTIVATIONS, "softmax", "log_softmax")


def activation_grad(tf: Any, name: str, z: Any, y: Any, g: Any) -> Any:
    """dL/dz for y = act(z); z (a tensor or a zero-argument callable giving it, so
    activations that need only y never recompute z) and y are (N, ...), g (N, T, ...)."""
    if name in ("linear", None):
        return g
    zf: Callable[[], Any] = z if callable(z) else (lambda: z)
    y1 = tf.expand_dims(y, 1)
    if name == "softmax":  # d softmax: y * (g - sum(g * y))
        return y1 * (g - tf.reduce_sum(g * y1, axis=-1, keepdims=True))
    if name == "log_softmax":  # g - softmax(z) * sum(g)
        return g - tf.exp(y1) * tf.reduce_sum(g, axis=-1, keepdims=True)
    table = _act_derivatives(tf)
    if name not in table:
        raise UnsupportedHead([f"activation {name!r}"])
    return g * tf.expand_dims(table[name](zf, y), 1)


def activation_name(fn: Any) -> str:
    if fn is None:
        return "linear"
    name = str(getattr(fn, "__name__", None) or fn)
    if name == "hard_sigmoid" and str(getattr(fn, "__module__", "")).startswith("tf_keras"):
        return "hard_sigmoid_keras2"  # 0.2x + 0.5, clipped: no rule
    return name


# --- simple layers -----------------------------------------------------------------


@rule(*IDENTITY_KINDS)
def _identity(tf: Any, call: Call, g: Any) -> Any:
    return g


@rule("Flatten", "Reshape")
def _reshape(tf: Any, call: Call, g: Any) -> Any:
    return tf.reshape(g, _nt_shape(tf, g, _x(call).shape[1:]))


def _layer_z(tf: Any, call: Call, linear: Callable[[Any], Any]) -> Callable[[], Any]:
    """The pre-activation of a layer with a built-in activation, recomputed lazily."""
    memo: list[Any] = []

    def z() -> Any:
        if not memo:
            out = linear(_x(call))
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
        z = _layer_z(tf, call, lambda x: tf.tensordot(x, kernel, 1))
        g = activation_grad(tf, act, z, call.output, g)
    return matmul_t(tf, g, kernel)


@rule("Activation")
def _activation(tf: Any, call: Call, g: Any) -> Any:
    return activation_grad(tf, activation_name(call.layer.activation), _x(call), call.output, g)


def _cfg(call: Call) -> dict[str, Any]:
    return dict(call.layer.get_config())


@rule("ReLU")
def _relu(tf: Any, call: Call, g: Any) -> Any:
    cfg = _cfg(call)
    top = cfg.get("max_value")
    slope = float(cfg.get("negative_slope") or 0.0)
    threshold = float(cfg.get("threshold") or 0.0)
    z = tf.expand_dims(_x(call), 1)
    on = z > threshold
    if top is not None:
        on = on & (z < float(top))
    d = tf.cast(on, g.dtype)
    if slope:
        d = d + slope * tf.cast(z <= threshold, g.dtype)
    return g * d


@rule("LeakyReLU")
def _leaky(tf: Any, call: Call, g: Any) -> Any:
    cfg = _cfg(call)
    slope = float(cfg.get("negative_slope", cfg.get("alpha", 0.3)))
    z = tf.expand_dims(_x(call), 1)
    return g * tf.where(z > 0, 1.0, slope)


@rule("ELU")
def _elu(tf: Any, call: Call, g: Any) -> Any:
    alpha = float(_cfg(call).get("alpha", 1.0))
    z = tf.expand_dims(_x(call), 1)
    return g * tf.where(z > 0, 1.0, alpha * tf.exp(tf.minimum(z, 0.0)))


@rule("PReLU")
def _prelu(tf: Any, call: Call, g: Any) -> Any:
    z = tf.expand_dims(_x(call), 1)
    return g * tf.where(z > 0, 1.0, var(tf, call.layer.alpha))


@rule("Softmax")
def _softmax(tf: Any, call: Call, g: Any) -> Any:
    axis = _cfg(call).get("axis", -1)
    if axis not in (-1, [-1], len(_x(call).shape) - 1):
        raise UnsupportedHead([f"{call.name} (Softmax over axis {axis})"])
    return activation_grad(tf, "softmax", _x(call), call.output, g)


def _last_axis(call: Call, axis: Any) -> bool:
    rank = len(_x(call).shape)
    if isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    return axis in (-1, rank - 1)


@rule("BatchNormalization")
def _batchnorm(tf: Any, call: Call, g: Any) -> Any:
    cfg = _cfg(call)
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
    cfg = _cfg(call)
    if not _last_axis(call, cfg.get("axis", -1)) or cfg.get("rms_scaling"):
        raise UnsupportedHead([f"{call.name} (LayerNormalization not over the last axis)"])
    x = tf.expand_dims(_x(call), 1)
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
    scale = np.asarray(_cfg(call).get("scale", 1.0), np.float32)
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
    return tf.reshape(grad, _nt_shape(tf, grad, [d or 1 for d in like.shape[1:]]))


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
    axis = int(_cfg(call).get("axis", -1))
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


# --- global and local pooling ------------------------------------------------------


@rule("GlobalAveragePooling2D")
def _gap(tf: Any, call: Call, g: Any) -> Any:
    x = _x(call)
    h, w, k = x.shape[1], x.shape[2], x.shape[3]
    g = tf.reshape(g, _nt_shape(tf, g, (1, 1, k)))
    return tf.tile(g, [1, 1, h, w, 1]) / float(h * w)


@rule("GlobalMaxPooling2D")
def _gmp(tf: Any, call: Call, g: Any) -> Any:
    x = _x(call)
    h, w, k = x.shape[1], x.shape[2], x.shape[3]
    # as TF's reduce_max gradient: shared equally by every position equal to the max
    top = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    hit = tf.cast(tf.equal(x, top), g.dtype)
    mask = hit / tf.reduce_sum(hit, axis=[1, 2], keepdims=True)
    mask = tf.reshape(mask, [-1, 1, h, w, k])
    g = tf.reshape(g, _nt_shape(tf, g, (1, 1, k)))
    return mask * g


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _same_pads(size: int, out: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TF's SAME padding (before, after) along one axis."""
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pads(call: Call, k: tuple[int, int], s: tuple[int, int], padding: str) -> list[int]:
    """[top, bottom, left, right] for a layer's geometry."""
    x, y = _x(call), call.output
    if padding.lower() == "valid":
        return [0, 0, 0, 0]
    t, b = _same_pads(int(x.shape[1]), int(y.shape[1]), k[0], s[0])
    left, r = _same_pads(int(x.shape[2]), int(y.shape[2]), k[1], s[1])
    return [t, b, left, r]


def _upsample(tf: Any, g: Any, sh: int, sw: int) -> Any:
    """(B, ho, wo, C) -> (B, (ho-1)*sh+1, (wo-1)*sw+1, C): values at stride positions."""
    if sh == 1 and sw == 1:
        return g
    ho, wo, c = (int(d) for d in g.shape[1:])
    g = tf.reshape(g, [-1, ho, 1, wo, 1, c])
    g = tf.pad(g, [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1], [0, 0]])
    g = tf.reshape(g, [-1, ho * sh, wo * sw, c])
    return g[:, : (ho - 1) * sh + 1, : (wo - 1) * sw + 1, :]


def _place(tf: Any, g: Any, top: int, left: int, hp: int, wp: int) -> Any:
    """Put (B, a, b, C) at (top, left) of a zero (B, hp, wp, C) canvas (crop overflow)."""
    a, b = int(g.shape[1]), int(g.shape[2])
    g = g[:, : max(hp - top, 0), : max(wp - left, 0), :]
    a, b = min(a, hp - top), min(b, wp - left)
    return tf.pad(g, [[0, 0], [top, hp - top - a], [left, wp - left - b], [0, 0]])


def _pool_geometry(call: Call) -> tuple[tuple[int, int], tuple[int, int], list[int]]:
    cfg = _cfg(call)
    if cfg.get("data_format", "channels_last") not in ("channels_last", None):
        raise UnsupportedHead([f"{call.name} (channels_first)"])
    k = _pair(cfg["pool_size"])
    s = _pair(cfg.get("strides") or cfg["pool_size"])
    return k, s, _pads(call, k, s, str(cfg.get("padding", "valid")))


def _window_scatter(tf: Any, call: Call, g: Any, weight: Callable[[int, int], Any]) -> Any:
    """Sum over window offsets (a, b) of weight(a, b) * g placed at a + i*s, b + j*s."""
    (ph, pw), (sh, sw), (pt, pb, pl, pr) = _pool_geometry(call)
    x = _x(call)
    h, w = int(x.shape[1]), int(x.shape[2])
    hp, wp = h + pt + pb, w + pl + pr
    g4, nt = _merge_nt(tf, g)
    total = None
    for a in range(ph):
        for b in range(pw):
            part = _upsample(tf, g4 * weight(a, b), sh, sw)
            part = _place(tf, part, a, b, hp, wp)
            total = part if total is None else total + part
    assert total is not None
    return _split_nt(tf, total[:, pt : pt + h, pl : pl + w, :], nt)


@rule("MaxPooling2D")
def _maxpool(tf: Any, call: Call, g: Any) -> Any:
    """Each window's gradient goes to its first maximum, as TF's MaxPoolGrad does;
    overlapping windows add up."""
    (ph, pw), (sh, sw), (pt, pb, pl, pr) = _pool_geometry(call)
    x = _x(call)
    ho, wo = int(call.output.shape[1]), int(call.output.shape[2])
    xp = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]], constant_values=float("-inf"))
    wins = [
        xp[:, a : a + (ho - 1) * sh + 1 : sh, b : b + (wo - 1) * sw + 1 : sw, :]
        for a in range(ph)
        for b in range(pw)
    ]
    mask = tf.one_hot(tf.argmax(tf.stack(wins, axis=-1), axis=-1), ph * pw, dtype=g.dtype)
    n_t = tf.shape(g)[1]

    def weight(a: int, b: int) -> Any:
        m = mask[..., a * pw + b]  # (N, ho, wo, K) -> (N*T, ...)
        m = tf.repeat(m, n_t, axis=0)
        return m

    return _window_scatter(tf, call, g, weight)


@rule("AveragePooling2D")
def _avgpool(tf: Any, call: Call, g: Any) -> Any:
    """Each window's gradient is shared by its cells; with 'same' padding TF divides by
    the number of cells inside the image."""
    (ph, pw), (sh, sw), (pt, pb, pl, pr) = _pool_geometry(call)
    x = _x(call)
    h, w = int(x.shape[1]), int(x.shape[2])
    ho, wo = int(call.output.shape[1]), int(call.output.shape[2])
    ones = np.pad(np.ones((h, w), np.float32), [[pt, pb], [pl, pr]])
    count = np.zeros((ho, wo), np.float32)
    for a in range(ph):
        for b in range(pw):
            count += ones[a : a + (ho - 1) * sh + 1 : sh, b : b + (wo - 1) * sw + 1 : sw]
    inv = tf.constant((1.0 / count)[None, :, :, None])
    return _window_scatter(tf, call, g, lambda a, b: inv)


@rule("ZeroPadding2D")
def _zeropad(tf: Any, call: Call, g: Any) -> Any:
    (t, b), (left, r) = (_pair(p) for p in _cfg(call)["padding"])
    x = _x(call)
    h, w = int(x.shape[1]), int(x.shape[2])
    return g[:, :, t : t + h, left : left + w, :]


@rule("Cropping2D")
def _crop(tf: Any, call: Call, g: Any) -> Any:
    (t, b), (left, r) = (_pair(p) for p in _cfg(call)["cropping"])
    return tf.pad(g, [[0, 0], [0, 0], [t, b], [left, r], [0, 0]])


# --- convolutions ------------------------------------------------------------------


def _conv_geometry(call: Call) -> tuple[tuple[int, int], tuple[int, int], str]:
    layer = call.layer
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedHead([f"{call.name} (channels_first)"])
    if _pair(layer.dilation_rate) != (1, 1):
        raise UnsupportedHead([f"{call.name} (dilated convolution)"])
    return _pair(layer.kernel_size), _pair(layer.strides), str(layer.padding).upper()


def depthwise_input_grad(
    tf: Any, g4: Any, kernel: Any, call: Call, k: tuple[int, int], s: tuple[int, int], pad: str
) -> Any:
    """d/dx of a depthwise convolution (kernel (kh, kw, C, m)), g4 (B, ho, wo, C*m):
    the stride-dilated gradient fully correlated with the flipped kernel, then cropped
    to the input, summing over the depth multiplier."""
    x = _x(call)
    h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    (kh, kw), (sh, sw) = k, s
    ho, wo = int(g4.shape[1]), int(g4.shape[2])
    m = int(kernel.shape[3])
    if pad == "VALID":
        pt = pl = 0
        hp, wp = h, w
    else:
        pt, pb = _same_pads(h, ho, kh, sh)
        pl, pr = _same_pads(w, wo, kw, sw)
        hp, wp = h + pt + pb, w + pl + pr
    gu = _upsample(tf, g4, sh, sw)
    gu = tf.pad(gu, [[0, 0], [kh - 1, kh - 1], [kw - 1, kw - 1], [0, 0]])
    flipped = tf.reshape(tf.reverse(kernel, axis=[0, 1]), [kh, kw, c * m, 1])
    full = tf.nn.depthwise_conv2d(gu, flipped, [1, 1, 1, 1], "VALID")  # (B, hc, wc, C*m)
    hc, wc = (ho - 1) * sh + kh, (wo - 1) * sw + kw
    full = tf.reduce_sum(tf.reshape(full, [-1, hc, wc, c, m]), axis=-1)
    full = _place(tf, full, 0, 0, hp, wp)
    return full[:, pt : pt + h, pl : pl + w, :]


@rule("Conv2D")
def _conv(tf: Any, call: Call, g: Any) -> Any:
    """Input gradient of a convolution: the transposed convolution of g."""
    layer = call.layer
    k, s, pad = _conv_geometry(call)
    kernel = var(tf, layer.kernel)
    groups = int(getattr(layer, "groups", 1) or 1)
    x = _x(call)
    cin = int(x.shape[3])
    act = activation_name(layer.activation)
    if groups > 1 and int(kernel.shape[2]) != 1:
        raise UnsupportedHead([f"{call.name} (grouped convolution, {groups} groups)"])
    if act != "linear":
        if groups > 1:
            raise UnsupportedHead([f"{call.name} (grouped convolution with an activation)"])
        z = _layer_z(tf, call, lambda v: tf.nn.conv2d(v, kernel, [1, *s, 1], pad))
        g = activation_grad(tf, act, z, call.output, g)
    g4, nt = _merge_nt(tf, g)
    if groups > 1:  # one input channel per group: a depthwise convolution
        dk = tf.reshape(kernel, [k[0], k[1], cin, int(kernel.shape[3]) // cin])
        return _split_nt(tf, depthwise_input_grad(tf, g4, dk, call, k, s, pad), nt)
    # a VALID transposed convolution onto the padded input's used rows (tf2onnx gives
    # ConvTranspose negative pads for TF's own output_shape arithmetic), then cropped
    h, w = int(x.shape[1]), int(x.shape[2])
    ho, wo = int(g4.shape[1]), int(g4.shape[2])
    hc, wc = (ho - 1) * s[0] + k[0], (wo - 1) * s[1] + k[1]
    shape = tf.stack([tf.shape(g4)[0], hc, wc, cin])
    full = tf.nn.conv2d_transpose(g4, kernel, shape, [1, *s, 1], "VALID")
    full = tf.reshape(full, [-1, hc, wc, cin])
    if pad == "VALID":
        pt = pl = 0
        hp, wp = h, w
    else:
        pt, pb = _same_pads(h, ho, k[0], s[0])
        pl, pr = _same_pads(w, wo, k[1], s[1])
        hp, wp = h + pt + pb, w + pl + pr
    dx = _place(tf, full, 0, 0, hp, wp)[:, pt : pt + h, pl : pl + w, :]
    return _split_nt(tf, dx, nt)


@rule("DepthwiseConv2D")
def _depthwise(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    k, s, pad = _conv_geometry(call)
    kernel = var(tf, layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel)
    act = activation_name(layer.activation)
    if act != "linear":
        z = _layer_z(tf, call, lambda v: tf.nn.depthwise_conv2d(v, kernel, [1, *s, 1], pad))
        g = activation_grad(tf, act, z, call.output, g)
    g4, nt = _merge_nt(tf, g)
    return _split_nt(tf, depthwise_input_grad(tf, g4, kernel, call, k, s, pad), nt)


@rule("SeparableConv2D")
def _separable(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    k, s, pad = _conv_geometry(call)
    dk = var(tf, layer.depthwise_kernel)
    pk = var(tf, layer.pointwise_kernel)
    act = activation_name(layer.activation)
    if act != "linear":
        z = _layer_z(tf, call, lambda v: tf.nn.separable_conv2d(v, dk, pk, [1, *s, 1], pad))
        g = activation_grad(tf, act, z, call.output, g)
    mid = matmul_t(tf, g, tf.reshape(pk, [int(pk.shape[2]), int(pk.shape[3])]))
    g4, nt = _merge_nt(tf, mid)
    return _split_nt(tf, depthwise_input_grad(tf, g4, dk, call, k, s, pad), nt)


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
