"""Backward rules of the spatial layers: pooling, padding and convolutions.

Registered into :data:`convlens.exporter.backward.RULES` on import.  A convolution's
input gradient is a transposed convolution (a VALID one onto the padded input, then
cropped); a depthwise convolution's is the stride-dilated gradient correlated with the
flipped kernel; pooling windows scatter their share back cell by cell, so overlapping
and 'same'-padded windows add up as TensorFlow's gradients do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .activations import activation_grad, activation_name
from .backward import (
    config,
    first_input,
    layer_z,
    matmul_t,
    merge_nt,
    nt_shape,
    rule,
    split_nt,
    var,
)
from .errors import UnsupportedHead
from .trace import Call

# --- global and local pooling ------------------------------------------------------


@rule("GlobalAveragePooling2D")
def _gap(tf: Any, call: Call, g: Any) -> Any:
    x = first_input(call)
    h, w, k = x.shape[1], x.shape[2], x.shape[3]
    g = tf.reshape(g, nt_shape(tf, g, (1, 1, k)))
    return tf.tile(g, [1, 1, h, w, 1]) / float(h * w)


@rule("GlobalMaxPooling2D")
def _gmp(tf: Any, call: Call, g: Any) -> Any:
    x = first_input(call)
    h, w, k = x.shape[1], x.shape[2], x.shape[3]
    # as TF's reduce_max gradient: shared equally by every position equal to the max
    top = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    hit = tf.cast(tf.equal(x, top), g.dtype)
    mask = hit / tf.reduce_sum(hit, axis=[1, 2], keepdims=True)
    mask = tf.reshape(mask, [-1, 1, h, w, k])
    g = tf.reshape(g, nt_shape(tf, g, (1, 1, k)))
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
    x, y = first_input(call), call.output
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
    cfg = config(call)
    if cfg.get("data_format", "channels_last") not in ("channels_last", None):
        raise UnsupportedHead([f"{call.name} (channels_first)"])
    k = _pair(cfg["pool_size"])
    s = _pair(cfg.get("strides") or cfg["pool_size"])
    return k, s, _pads(call, k, s, str(cfg.get("padding", "valid")))


def _window_scatter(tf: Any, call: Call, g: Any, weight: Callable[[int, int], Any]) -> Any:
    """Sum over window offsets (a, b) of weight(a, b) * g placed at a + i*s, b + j*s."""
    (ph, pw), (sh, sw), (pt, pb, pl, pr) = _pool_geometry(call)
    x = first_input(call)
    h, w = int(x.shape[1]), int(x.shape[2])
    hp, wp = h + pt + pb, w + pl + pr
    g4, nt = merge_nt(tf, g)
    total = None
    for a in range(ph):
        for b in range(pw):
            part = _upsample(tf, g4 * weight(a, b), sh, sw)
            part = _place(tf, part, a, b, hp, wp)
            total = part if total is None else total + part
    assert total is not None
    return split_nt(tf, total[:, pt : pt + h, pl : pl + w, :], nt)


@rule("MaxPooling2D")
def _maxpool(tf: Any, call: Call, g: Any) -> Any:
    """Each window's gradient goes to its first maximum, as TF's MaxPoolGrad does;
    overlapping windows add up."""
    (ph, pw), (sh, sw), (pt, pb, pl, pr) = _pool_geometry(call)
    x = first_input(call)
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
    x = first_input(call)
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
    (t, b), (left, r) = (_pair(p) for p in config(call)["padding"])
    x = first_input(call)
    h, w = int(x.shape[1]), int(x.shape[2])
    return g[:, :, t : t + h, left : left + w, :]


@rule("Cropping2D")
def _crop(tf: Any, call: Call, g: Any) -> Any:
    (t, b), (left, r) = (_pair(p) for p in config(call)["cropping"])
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
    x = first_input(call)
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
    x = first_input(call)
    cin = int(x.shape[3])
    act = activation_name(layer.activation)
    if groups > 1 and int(kernel.shape[2]) != 1:
        raise UnsupportedHead([f"{call.name} (grouped convolution, {groups} groups)"])
    if act != "linear":
        if groups > 1:
            raise UnsupportedHead([f"{call.name} (grouped convolution with an activation)"])
        z = layer_z(tf, call, lambda v: tf.nn.conv2d(v, kernel, [1, *s, 1], pad))
        g = activation_grad(tf, act, z, call.output, g)
    g4, nt = merge_nt(tf, g)
    if groups > 1:  # one input channel per group: a depthwise convolution
        dk = tf.reshape(kernel, [k[0], k[1], cin, int(kernel.shape[3]) // cin])
        return split_nt(tf, depthwise_input_grad(tf, g4, dk, call, k, s, pad), nt)
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
    return split_nt(tf, dx, nt)


@rule("DepthwiseConv2D")
def _depthwise(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    k, s, pad = _conv_geometry(call)
    kernel = var(tf, layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel)
    act = activation_name(layer.activation)
    if act != "linear":
        z = layer_z(tf, call, lambda v: tf.nn.depthwise_conv2d(v, kernel, [1, *s, 1], pad))
        g = activation_grad(tf, act, z, call.output, g)
    g4, nt = merge_nt(tf, g)
    return split_nt(tf, depthwise_input_grad(tf, g4, kernel, call, k, s, pad), nt)


@rule("SeparableConv2D")
def _separable(tf: Any, call: Call, g: Any) -> Any:
    layer = call.layer
    k, s, pad = _conv_geometry(call)
    dk = var(tf, layer.depthwise_kernel)
    pk = var(tf, layer.pointwise_kernel)
    act = activation_name(layer.activation)
    if act != "linear":
        z = layer_z(tf, call, lambda v: tf.nn.separable_conv2d(v, dk, pk, [1, *s, 1], pad))
        g = activation_grad(tf, act, z, call.output, g)
    mid = matmul_t(tf, g, tf.reshape(pk, [int(pk.shape[2]), int(pk.shape[3])]))
    g4, nt = merge_nt(tf, mid)
    return split_nt(tf, depthwise_input_grad(tf, g4, dk, call, k, s, pad), nt)
