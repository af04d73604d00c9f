"""An explicit registry of per-layer backward rules for the head after the CAM layer.

Grad-CAM needs dS_c/dA, the gradient of a class score with respect to the CAM layer's
output A.  A gradient traced by tf.GradientTape contains ops tf2onnx cannot convert
(ReluGrad, MaxPoolGrad, BroadcastGradientArgs, ...), so the exporter writes the
backward pass of the head itself, one rule per layer kind, out of ordinary forward ops
that tf2onnx converts (MatMul, Mul, Reshape, ArgMax, OneHot, Pad...).

Every rule takes the recorded forward call and the upstream gradient ``g`` of shape
``(N, T, *output.shape[1:])`` (T target classes per image, all at once: the backward
pass is linear in its seed) and returns ``(N, T, *input.shape[1:])``.  Layers with no
rule are collected and reported together (:class:`UnsupportedHead`).

The tests check every rule against tf.GradientTape on trained models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import UnsupportedHead
from .trace import IDENTITY_KINDS, Call

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


def _nt_shape(tf: Any, g: Any, tail: Any) -> Any:
    """Dynamic (N, T, *tail) shape."""
    s = tf.shape(g)
    return tf.concat([s[:2], tf.constant(list(tail), dtype=tf.int32)], axis=0)


def activation_grad(tf: Any, name: str, z: Any, y: Any, g: Any) -> Any:
    """dL/dz for y = act(z); z and y are (N, ...) forward tensors, g is (N, T, ...)."""
    z1 = tf.expand_dims(z, 1)
    y1 = tf.expand_dims(y, 1)
    if name in ("linear", None):
        return g
    if name == "relu":
        return g * tf.cast(z1 > 0, g.dtype)
    if name == "sigmoid":
        return g * y1 * (1.0 - y1)
    if name == "tanh":
        return g * (1.0 - y1 * y1)
    if name == "softmax":
        # d softmax: y * (g - sum(g * y))
        return y1 * (g - tf.reduce_sum(g * y1, axis=-1, keepdims=True))
    raise UnsupportedHead([f"activation {name!r}"])


def activation_name(fn: Any) -> str:
    if fn is None:
        return "linear"
    name = getattr(fn, "__name__", None) or str(fn)
    return str(name)


@rule(*IDENTITY_KINDS)
def _identity(tf: Any, call: Call, g: Any) -> Any:
    return g


@rule("Flatten", "Reshape")
def _reshape(tf: Any, call: Call, g: Any) -> Any:
    return tf.reshape(g, _nt_shape(tf, g, _x(call).shape[1:]))


@rule("Dense")
def _dense(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    x = _x(call)
    if len(x.shape) != 2:
        raise UnsupportedHead([f"{call.name} (Dense on a {len(x.shape)}-D input)"])
    kernel = tf.constant(call.weights[0])
    act = activation_name(layer.activation)
    if act != "linear":
        z = tf.matmul(x, kernel)
        if layer.use_bias:
            z = z + tf.constant(call.weights[1])
        g = activation_grad(tf, act, z, call.output, g)
    return tf.einsum("ntd,kd->ntk", g, kernel)


@rule("Activation")
def _activation(tf: Any, call: Call, g: Any) -> Any:
    return activation_grad(tf, activation_name(call.layer.activation), _x(call), call.output, g)


@rule("ReLU")
def _relu(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    cfg = layer.get_config()
    if (
        cfg.get("max_value") not in (None,)
        or cfg.get("negative_slope", 0.0)
        or cfg.get("threshold", 0.0)
    ):
        raise UnsupportedHead([f"{call.name} (ReLU with max_value/negative_slope/threshold)"])
    return activation_grad(tf, "relu", _x(call), call.output, g)


@rule("Softmax")
def _softmax(tf: Any, call: Call, g: Any) -> Any:
    return activation_grad(tf, "softmax", _x(call), call.output, g)


@rule("BatchNormalization")
def _batchnorm(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    cfg = layer.get_config()
    axis = cfg.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    rank = len(_x(call).shape)
    if axis not in (-1, rank - 1):
        raise UnsupportedHead([f"{call.name} (BatchNormalization over axis {axis})"])
    var = _find(call.named, "moving_variance")
    gamma = _find(call.named, "gamma") if cfg.get("scale", True) else 1.0
    factor = gamma / (var + cfg.get("epsilon", 1e-3)) ** 0.5
    return g * tf.constant(factor, dtype=g.dtype)


def _find(weights: dict[str, Any], key: str) -> Any:
    for k, v in weights.items():
        if key in k:
            return v
    raise KeyError(key)


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


def _pool_geometry(call: Call) -> tuple[int, int, int, int, int, int]:
    cfg = call.layer.get_config()
    ph, pw = _pair(cfg["pool_size"])
    strides = cfg.get("strides") or cfg["pool_size"]
    sh, sw = _pair(strides)
    if (ph, pw) != (sh, sw):
        raise UnsupportedHead(
            [f"{call.name} (overlapping pooling: pool {ph}x{pw}, stride {sh}x{sw})"]
        )
    if cfg.get("data_format", "channels_last") not in ("channels_last", None):
        raise UnsupportedHead([f"{call.name} (channels_first)"])
    x = _x(call)
    y = call.output
    return ph, pw, x.shape[1], x.shape[2], y.shape[1], y.shape[2]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _windows(tf: Any, x: Any, ph: int, pw: int, ho: int, wo: int, pad_value: float) -> Any:
    """(N, H, W, K) -> (N, ho, wo, K, ph*pw) non-overlapping windows (cropped or padded)."""
    h, w, k = x.shape[1], x.shape[2], x.shape[3]
    th, tw = ho * ph, wo * pw
    if th > h or tw > w:  # 'same' padding: TF pads bottom/right with the larger half
        pt, pl = (th - h) // 2, (tw - w) // 2
        x = tf.pad(
            x, [[0, 0], [pt, th - h - pt], [pl, tw - w - pl], [0, 0]], constant_values=pad_value
        )
    else:
        pt = pl = 0
        x = x[:, :th, :tw, :]
    x = tf.reshape(x, [-1, ho, ph, wo, pw, k])
    x = tf.transpose(x, [0, 1, 3, 5, 2, 4])
    return tf.reshape(x, [-1, ho, wo, k, ph * pw]), (pt, pl)


def _unwindows(
    tf: Any,
    gw: Any,
    ph: int,
    pw: int,
    h: int,
    w: int,
    ho: int,
    wo: int,
    k: int,
    offsets: tuple[int, int],
) -> Any:
    """(N, T, ho, wo, K, ph*pw) -> (N, T, H, W, K), inverse of _windows."""
    th, tw = ho * ph, wo * pw
    s = tf.shape(gw)
    g = tf.reshape(gw, tf.stack([s[0], s[1], ho, wo, k, ph, pw]))
    g = tf.transpose(g, [0, 1, 2, 5, 3, 6, 4])
    g = tf.reshape(g, tf.stack([s[0], s[1], th, tw, k]))
    pt, pl = offsets
    if th > h or tw > w:
        return g[:, :, pt : pt + h, pl : pl + w, :]
    return tf.pad(g, [[0, 0], [0, 0], [0, h - th], [0, w - tw], [0, 0]])


@rule("MaxPooling2D")
def _maxpool(tf: Any, call: Call, g: Any) -> Any:
    """Route the gradient to the first maximum of each window, as TF's MaxPoolGrad does."""
    ph, pw, h, w, ho, wo = _pool_geometry(call)
    x = _x(call)
    k = x.shape[3]
    win, off = _windows(tf, x, ph, pw, ho, wo, float("-inf"))
    mask = tf.one_hot(tf.argmax(win, axis=-1), ph * pw, dtype=g.dtype)  # (N, ho, wo, K, P)
    gw = tf.expand_dims(mask, 1) * tf.expand_dims(g, -1)
    return _unwindows(tf, gw, ph, pw, h, w, ho, wo, k, off)


@rule("AveragePooling2D")
def _avgpool(tf: Any, call: Call, g: Any) -> Any:
    ph, pw, h, w, ho, wo = _pool_geometry(call)
    k = _x(call).shape[3]
    if ho * ph > h or wo * pw > w:
        raise UnsupportedHead([f"{call.name} (AveragePooling2D with 'same' padding)"])
    gw = tf.tile(tf.expand_dims(g, -1), [1, 1, 1, 1, 1, ph * pw]) / float(ph * pw)
    return _unwindows(tf, gw, ph, pw, h, w, ho, wo, k, (0, 0))


def check_head(calls: list[Call]) -> list[str]:
    """Every layer in the head without a rule, described (empty when all are covered)."""
    problems = []
    for c in calls:
        if c.kind not in RULES:
            problems.append(f"{c.name} ({c.kind})")
    return problems


def backward(tf: Any, calls: list[Call], g: Any) -> Any:
    """Run the registered rules over ``calls`` in reverse, from g (N, T, *last.shape[1:])."""
    problems = check_head(calls)
    if problems:
        raise UnsupportedHead(problems)
    for c in reversed(calls):
        g = RULES[c.kind](tf, c, g)
    return g
