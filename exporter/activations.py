"""Derivatives of every Keras activation, for the backward rules.

Keras 3 definitions (``hard_sigmoid`` is ``relu6(x + 3) / 6``); each derivative is
written from the forward output where that suffices (relu, sigmoid, tanh, elu, selu,
exponential), so the pre-activation is recomputed only when needed.  The tests check
every entry against tf.GradientTape through Keras' own function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import UnsupportedHead

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


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
