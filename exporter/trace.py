"""Record what a Keras model does when called: every leaf layer's input and output.

Nested models (Sequential or Functional inside Functional, any depth) are walked down
to their leaf layers; each leaf's ``call`` is wrapped so that calling the model inside a
``tf.function`` (or eagerly, under a GradientTape) records ``(layer, input, output)`` in
execution order.  This works the same for Sequential, Functional and nested models and
for models loaded from legacy .h5, because it uses the one call graph that actually runs
(no ``layer.output`` of another graph).
"""

from __future__ import annotations

import contextlib
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
)
# layers that directly follow a conv and belong to "its activation"
POST_CONV_KINDS = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU")


def layer_kind(layer: Any) -> str:
    """The Keras class name a layer is (or derives from), for rule lookup.

    Class names rather than isinstance, so tf_keras (Keras 2) layers match too.
    """
    known = (
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
        "Activation",
        "ReLU",
        "LeakyReLU",
        "ELU",
        "PReLU",
        "Softmax",
        "Rescaling",
        "Normalization",
        "InputLayer",
    )
    for cls in type(layer).__mro__:
        if cls.__name__ in known:
            return cls.__name__
        if cls.__name__ in ("MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "GlobalMaxPool2D"):
            return {
                "MaxPool2D": "MaxPooling2D",
                "AvgPool2D": "AveragePooling2D",
                "GlobalAvgPool2D": "GlobalAveragePooling2D",
                "GlobalMaxPool2D": "GlobalMaxPooling2D",
            }[cls.__name__]
    return type(layer).__name__


def is_container(layer: Any) -> bool:
    """A nested model (has sub-layers and is a Model)."""
    return any(c.__name__ in ("Model", "Functional", "Sequential") for c in type(layer).__mro__)


def leaf_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        if is_container(layer):
            yield from leaf_layers(layer)
        else:
            yield layer


@dataclass
class Call:
    layer: Any
    name: str
    kind: str
    inputs: Any
    output: Any
    weights: list[Any] = field(default_factory=list)  # numpy, in get_weights() order
    named: dict[str, Any] = field(default_factory=dict)  # short weight name -> numpy


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)

    def index_of(self, name: str) -> int:
        for i, c in enumerate(self.calls):
            if c.name == name:
                return i
        raise KeyError(name)

    def chain_ok(self, start: int) -> bool:
        """True when calls[start+1:] form a single chain fed by calls[start]."""
        prev = self.calls[start].output
        for c in self.calls[start + 1 :]:
            if not _same_tensor(c.inputs, prev):
                return False
            prev = c.output
        return True


def _same_tensor(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == 1 and a[0] is b
    return a is b


class Recorder:
    """Wraps every leaf layer's ``call``; ``with recorder.recording() as trace: model(x)``."""

    def __init__(self, model: Any):
        self.model = model
        self.leaves = list(leaf_layers(model))
        self.names = _unique_names(self.leaves)
        self._active: Trace | None = None
        self._hooks: dict[str, Callable[[Any], Any]] = {}
        self._originals: list[tuple[Any, Any]] = []
        # weights read eagerly once: inside tf.function they cannot be read as numpy
        self.weights: dict[str, tuple[list[Any], dict[str, Any]]] = {}
        for layer in self.leaves:
            arrays = [w for w in layer.get_weights()]
            named = {}
            for var, arr in zip(layer.weights, arrays, strict=False):
                short = str(getattr(var, "path", None) or var.name).split("/")[-1]
                named[short.split(":")[0]] = arr
            self.weights[self.names[id(layer)]] = (arrays, named)
        for layer in self.leaves:
            self._wrap(layer)

    def _wrap(self, layer: Any) -> None:
        original = layer.call
        name = self.names[id(layer)]
        kind = layer_kind(layer)
        recorder = self

        def call(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            hook = recorder._hooks.get(name)
            if hook is not None:
                out = hook(out)
            if recorder._active is not None:
                arrays, named = recorder.weights[name]
                recorder._active.calls.append(
                    Call(
                        layer=layer,
                        name=name,
                        kind=kind,
                        inputs=args[0],
                        output=out,
                        weights=arrays,
                        named=named,
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
    def recording(self, hooks: dict[str, Callable[[Any], Any]] | None = None) -> Iterator[Trace]:
        trace = Trace()
        self._active = trace
        self._hooks = hooks or {}
        try:
            yield trace
        finally:
            self._active = None
            self._hooks = {}


def _unique_names(layers: list[Any]) -> dict[int, str]:
    seen: dict[str, int] = {}
    out: dict[int, str] = {}
    for layer in layers:
        base = str(layer.name)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out[id(layer)] = base if n == 0 else f"{base}_{n}"
    return out
