"""Record what a Keras model does when called: every operation's inputs and output.

Nested models (Sequential or Functional inside Functional, any depth) are walked down
to their leaf layers, and the raw Keras 3 operations of a Functional graph (``x + 3.0``,
``ops.multiply``) are included; each one's ``call`` is wrapped so that calling the model
inside a ``tf.function`` (or eagerly, under a GradientTape) records ``(layer, inputs,
output)`` in execution order.  This uses the one call graph that actually runs (no
``layer.output`` of another graph), for Sequential, Functional, nested and legacy .h5
models alike.

A :class:`Trace` is a graph: tensors are matched by identity, so every call knows which
calls produced its inputs and which consume its output.

While recording for the export, :data:`REWRITES` replaces the few Keras forward
implementations that tf2onnx cannot convert by equivalent TensorFlow ops (grouped
convolutions, which Keras' TF backend compiles through a nested XLA function, and
exact GELU, which uses ``Erfc``).  References (Keras predictions, GradientTape) always
run the original Keras code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CONV_KINDS = ("Conv2D", "SeparableConv2D", "DepthwiseConv2D")
# layers that are the identity at inference
IDENTITY_KINDS = (
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "StochasticDepth",  # ConvNeXt
)
# layers that directly follow a conv and belong to "its activation"
POST_CONV_KINDS = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU")
POOL_KINDS = ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten")
OP_PREFIX = "op:"  # kind of a raw Keras 3 operation (not a Layer), e.g. "op:Add"

_ALIASES = {
    "MaxPool2D": "MaxPooling2D",
    "AvgPool2D": "AveragePooling2D",
    "GlobalAvgPool2D": "GlobalAveragePooling2D",
    "GlobalMaxPool2D": "GlobalMaxPooling2D",
}
_KNOWN = (
    *CONV_KINDS,
    *IDENTITY_KINDS,
    "Dense",
    "Flatten",
    "Reshape",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "BatchNormalization",
    "LayerNormalization",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "PReLU",
    "Softmax",
    "Rescaling",
    "Normalization",
    "InputLayer",
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Concatenate",
    "ZeroPadding2D",
    "Cropping2D",
    "LayerScale",
)


def layer_kind(layer: Any) -> str:
    """The Keras class name a layer is (or derives from), for rule lookup.

    Class names rather than isinstance, so tf_keras (Keras 2) layers match too.  A raw
    Keras 3 operation gets :data:`OP_PREFIX` before its class name.
    """
    mro = [c.__name__ for c in type(layer).__mro__]
    if "Layer" not in mro:
        return OP_PREFIX + type(layer).__name__
    for name in mro:
        if name in _KNOWN:
            return name
        if name in _ALIASES:
            return _ALIASES[name]
    return type(layer).__name__


def is_container(layer: Any) -> bool:
    """A nested model (has sub-layers and is a Model)."""
    return any(c.__name__ in ("Model", "Functional", "Sequential") for c in type(layer).__mro__)


def _children(model: Any) -> list[Any]:
    """A container's layers, and (Keras 3 Functional) its raw operations, in graph order."""
    ops = getattr(model, "_operations", None)
    if isinstance(ops, list) and ops:
        return [op for op in ops if type(op).__name__ != "InputLayer"]
    return list(model.layers)


def leaf_operations(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, op)`` for every leaf layer and raw operation; path is ``outer/inner``."""
    for op in _children(model):
        path = f"{prefix}{op.name}"
        if is_container(op):
            yield from leaf_operations(op, path + "/")
        else:
            yield path, op


def flat(value: Any) -> list[Any]:
    """The tensors of a (possibly nested) list/tuple/dict structure, in order."""
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat(v)]
    return [value] if hasattr(value, "shape") and hasattr(value, "dtype") else []


@dataclass
class Call:
    layer: Any
    name: str
    kind: str
    inputs: Any  # the first positional argument (a tensor, or a list for merge layers)
    output: Any
    store: LayerWeights | None = None  # the layer's weights, read when asked for
    args: tuple[Any, ...] = ()  # every positional argument
    path: str = ""  # outer/inner

    @property
    def input_tensors(self) -> list[Any]:
        return flat(self.args)

    @property
    def weights(self) -> list[Any]:
        """numpy, in get_weights() order."""
        return self.store.arrays if self.store is not None else []

    @property
    def named(self) -> dict[str, Any]:
        """short weight name -> numpy."""
        return self.store.named if self.store is not None else {}


class LayerWeights:
    """A layer's weights as numpy, read the first time they are asked for and kept.

    Only the few layers whose values a rule or the plan needs (BatchNormalization, the
    classifier) are ever copied; reading every layer's up front held a second copy of
    the whole model (1.4 GB for ConvNeXtXLarge).  The read is lifted out of any
    tf.function being traced, where variables cannot be read as numpy.
    """

    def __init__(self, layer: Any):
        self.layer = layer
        self._arrays: list[Any] | None = None
        self._named: dict[str, Any] = {}

    @property
    def arrays(self) -> list[Any]:
        if self._arrays is None:
            self._arrays, self._named = self._read()
        return self._arrays

    @property
    def named(self) -> dict[str, Any]:
        if self._arrays is None:
            self._arrays, self._named = self._read()
        return self._named

    def _read(self) -> tuple[list[Any], dict[str, Any]]:
        if not hasattr(self.layer, "get_weights"):
            return [], {}
        import tensorflow as tf

        with tf.init_scope():
            arrays = list(self.layer.get_weights())
        named = {}
        for var, arr in zip(getattr(self.layer, "weights", []), arrays, strict=False):
            short = str(getattr(var, "path", None) or var.name).split("/")[-1]
            named[short.split(":")[0]] = arr
        return arrays, named


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)

    def index_of(self, name: str) -> int:
        for i, c in enumerate(self.calls):
            if name in (c.name, c.path):
                return i
        raise KeyError(name)

    def producer(self, tensor: Any) -> int | None:
        """Index of the call that output ``tensor`` (the last one, for pass-throughs)."""
        for i in range(len(self.calls) - 1, -1, -1):
            if any(t is tensor for t in flat(self.calls[i].output)):
                return i
        return None

    def consumers(self, tensor: Any) -> list[int]:
        return [i for i, c in enumerate(self.calls) if any(t is tensor for t in c.input_tensors)]

    def descendants(self, tensor: Any) -> list[int]:
        """Indices of the calls whose inputs depend on ``tensor``, in execution order."""
        dep = {id(tensor)}  # ids are stable: the trace holds every tensor alive
        out = []
        for i, c in enumerate(self.calls):
            if any(id(t) in dep for t in c.input_tensors):
                out.append(i)
                dep.update(id(t) for t in flat(c.output))
        return out


# --- trace-time rewrites of forward passes tf2onnx cannot convert --------------------


def _grouped_conv(tf: Any, layer: Any, x: Any) -> Any | None:
    """Conv2D(groups > 1) without Keras' nested XLA function: depthwise when every group
    has one input channel (ConvNeXt), else one convolution per group."""
    groups = int(getattr(layer, "groups", 1) or 1)
    if groups == 1 or getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    kernel = tf.convert_to_tensor(layer.kernel)
    kh, kw, cin_g, cout = (int(d) for d in kernel.shape)
    strides = [1, *_pair(layer.strides), 1]
    dil = _pair(layer.dilation_rate)
    pad = str(layer.padding).upper()
    if cin_g == 1:  # depthwise: out channel j reads input channel j // (cout // groups)
        mult = cout // groups
        k = tf.reshape(kernel, [kh, kw, groups, mult])
        y = tf.nn.depthwise_conv2d(x, k, strides, pad, dilations=dil)
    else:
        xs = tf.split(x, groups, axis=-1)
        ks = tf.split(kernel, groups, axis=-1)
        y = tf.concat(
            [tf.nn.conv2d(a, b, strides, pad, dilations=dil) for a, b in zip(xs, ks, strict=True)],
            axis=-1,
        )
    if layer.use_bias:
        y = y + tf.convert_to_tensor(layer.bias)
    return layer.activation(y) if layer.activation is not None else y


def gelu_erf(tf: Any, x: Any, approximate: bool = False) -> Any:
    """GELU with Erf (which ONNX has) instead of TF's Erfc; tanh form when approximate."""
    if approximate:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + tf.tanh(c * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


# kind -> rewrite(tf, layer, first input) returning the output, or None to run Keras
REWRITES: dict[str, Callable[[Any, Any, Any], Any | None]] = {"Conv2D": _grouped_conv}


@contextlib.contextmanager
def _patched_gelu(tf: Any) -> Iterator[None]:
    """tf.nn.gelu (what Keras' TF backend calls, for Activation and Dense alike) as Erf."""
    original = tf.nn.gelu

    def gelu(x: Any, approximate: bool = False, name: Any = None) -> Any:
        return gelu_erf(tf, tf.convert_to_tensor(x), bool(approximate))

    tf.nn.gelu = gelu
    try:
        yield
    finally:
        tf.nn.gelu = original


class Recorder:
    """Wraps every leaf's ``call``; ``with recorder.recording() as trace: model(x)``."""

    def __init__(self, model: Any):
        self.model = model
        self.leaves = list(leaf_operations(model))
        self.names = _unique_names([op for _, op in self.leaves])
        self.paths = {id(op): path for path, op in self.leaves}
        self._active: Trace | None = None
        self._rewrite: Any = None  # the tf module while rewriting, else None
        self._hooks: dict[str, Callable[[Any], Any]] = {}
        self._originals: list[tuple[Any, Any]] = []
        self.weights = {self.names[id(layer)]: LayerWeights(layer) for _, layer in self.leaves}
        for _, layer in self.leaves:
            self._wrap(layer)

    def _wrap(self, layer: Any) -> None:
        original = layer.call
        name = self.names[id(layer)]
        path = self.paths[id(layer)]
        kind = layer_kind(layer)
        rewrite = REWRITES.get(kind)
        recorder = self

        def call(*args: Any, **kwargs: Any) -> Any:
            out = None
            if recorder._rewrite is not None and rewrite is not None and args:
                out = rewrite(recorder._rewrite, layer, args[0])
            if out is None:
                out = original(*args, **kwargs)
            active = recorder._active
            # a layer called more than once (a shared layer): each call its own name
            seen = 0 if active is None else sum(1 for c in active.calls if c.layer is layer)
            call_name = name if not seen else f"{name}_call{seen + 1}"
            hook = recorder._hooks.get(call_name)
            if hook is not None:
                out = hook(out)
            if active is not None:
                active.calls.append(
                    Call(
                        layer=layer,
                        name=call_name,
                        kind=kind,
                        inputs=args[0] if args else None,
                        output=out,
                        store=recorder.weights[name],
                        args=args,
                        path=path,
                    )
                )
            return out

        self._originals.append((layer, original))
        layer.call = call

    def restore(self) -> None:
        for layer, original in self._originals:
            layer.call = original
        self._originals.clear()

    @contextlib.contextmanager
    def recording(
        self, hooks: dict[str, Callable[[Any], Any]] | None = None, rewrite_with: Any = None
    ) -> Iterator[Trace]:
        """Record calls; ``rewrite_with=tf`` applies :data:`REWRITES` (export only)."""
        trace = Trace()
        self._active = trace
        self._hooks = hooks or {}
        self._rewrite = rewrite_with
        gelu = _patched_gelu(rewrite_with) if rewrite_with is not None else contextlib.nullcontext()
        try:
            with gelu:
                yield trace
        finally:
            self._active = None
            self._hooks = {}
            self._rewrite = None


def _unique_names(layers: list[Any]) -> dict[int, str]:
    seen: dict[str, int] = {}
    out: dict[int, str] = {}
    for layer in layers:
        base = str(layer.name)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out[id(layer)] = base if n == 0 else f"{base}_{n}"
    return out
