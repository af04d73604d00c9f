"""Decide what an analysis export contains: exposed layers, the CAM tensor, the head.

The plan is made from one eager trace of the model and refers to calls by name, so it
can be re-applied to every later trace (inside tf.function, under a GradientTape).

The CAM tensor is by default the backbone's final spatial feature map: the 4-D tensor
that the head's global pooling or Flatten consumes, whatever layer produced it (the
Activation after a residual Add, a Concatenate, a nested base model's output).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .activations import activation_name
from .backward import check_path, path_calls
from .errors import ExportError
from .trace import CONV_KINDS, IDENTITY_KINDS, POOL_KINDS, POST_CONV_KINDS, Call, Trace


@dataclass
class ExposedLayer:
    """An exposed activation: ``act/<name>`` is the output of the call ``exposed``
    (for a convolution, after the BN/activation layers that alone consume it)."""

    name: str
    exposed: str
    kind: str


@dataclass
class Plan:
    exposed: list[ExposedLayer]
    cam_layer: str  # the name of the exposed activation that is the CAM tensor
    cam_exposed: str  # call name whose output is A
    final: str  # name of the last call
    final_mode: str  # "dense" (recompute z = xW+b), "activation" (z = input), "linear" (z = output)
    activation: str  # softmax | sigmoid | linear
    units: int
    binary_sigmoid: bool
    head_kind: str  # gap_dense | class_conv | dense
    head_calls: list[str]  # calls on the paths from A to z
    gradient_problems: list[str] = field(default_factory=list)
    cam_weights: np.ndarray | None = None
    cam_bias: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return 2 if self.binary_sigmoid else self.units

    @property
    def gradients_available(self) -> bool:
        return not self.gradient_problems


def _exposed_index(trace: Trace, i: int) -> int:
    """Follow a conv's consumer chain while its one consumer is a BN/activation layer."""
    calls = trace.calls
    j = i
    while True:
        users = trace.consumers(calls[j].output)
        if len(users) != 1:
            return j
        u = users[0]
        if calls[u].kind not in POST_CONV_KINDS or len(calls[u].input_tensors) != 1:
            return j
        j = u


def _is_4d(c: Call) -> bool:
    return hasattr(c.output, "shape") and len(c.output.shape) == 4


def _spatial(c: Call) -> int:
    return int(c.output.shape[1] or 0) * int(c.output.shape[2] or 0)


def _find_call(trace: Trace, name: str) -> int | None:
    for i, c in enumerate(trace.calls):
        if name in (c.name, c.path):
            return i
    return None


def _unknown_layer(what: str, name: str, candidates: list[Call]) -> ExportError:
    names = [c.name for c in candidates]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    last = names[-5:]
    hint = ", ".join(dict.fromkeys([*close, *reversed(last)]))
    return ExportError(f"{what}: no layer named {name!r} with a 4-D output; try one of: {hint}")


def _default_cam(trace: Trace) -> int:
    """The call whose output the head's last global pooling / Flatten consumes."""
    calls = trace.calls
    for c in reversed(calls):
        if c.kind in POOL_KINDS and len(c.input_tensors) == 1:
            x = c.input_tensors[0]
            if len(x.shape) == 4 and int(x.shape[1]) * int(x.shape[2]) > 1:
                p = trace.producer(x)
                if p is not None:
                    return p
    spatial = [i for i, c in enumerate(calls) if c.kind in CONV_KINDS and _spatial(c) > 1]
    if not spatial:
        raise ExportError(
            "the model has no spatial feature map larger than 1x1 to make a CAM from; "
            "export at a larger input size"
        )
    return _exposed_index(trace, spatial[-1])


def make_plan(trace: Trace, layers: list[str] | None, cam_layer: str | None) -> Plan:
    calls = trace.calls
    if not calls:
        raise ExportError("the model ran no layers")
    convs = [i for i, c in enumerate(calls) if c.kind in CONV_KINDS]
    if not convs:
        raise ExportError(
            "the model has no convolution layer (Conv2D, SeparableConv2D, DepthwiseConv2D): "
            "nothing for convlens to show"
        )
    for i in convs:
        if len(calls[i].output.shape) != 4:
            raise ExportError(f"layer {calls[i].name}: only 2-D convolutions are supported")
    four_d = [c for c in calls if _is_4d(c)]

    if layers:
        unknown = [n for n in layers if _find_call(trace, n) is None]
        if unknown:
            raise _unknown_layer("--layers", unknown[0], four_d)
        chosen = [i for i in (_find_call(trace, n) for n in layers) if i is not None]
    else:
        chosen = list(convs)

    exposed: list[ExposedLayer] = []
    by_tensor: dict[int, str] = {}
    for i in chosen:
        c = calls[i]
        if not _is_4d(c):
            raise ExportError(f"--layers: {c.name} has no 4-D output")
        j = _exposed_index(trace, i) if c.kind in CONV_KINDS else i
        exposed.append(ExposedLayer(name=c.name, exposed=calls[j].name, kind=c.kind))
        by_tensor.setdefault(id(calls[j].output), c.name)

    # --- the CAM tensor -------------------------------------------------------------
    if cam_layer is None:
        a_i = _default_cam(trace)
    else:
        found = _find_call(trace, cam_layer)
        if found is None or not _is_4d(calls[found]):
            raise _unknown_layer("--cam-layer", cam_layer, four_d)
        a_i = _exposed_index(trace, found) if calls[found].kind in CONV_KINDS else found
    a = calls[a_i].output
    if id(a) in by_tensor:
        cam_name = by_tensor[id(a)]
    else:
        # the CAM tensor is a conv's exposed output (conv -> BN -> ReLU): name it by the conv
        conv_of = [i for i in convs if calls[_exposed_index(trace, i)].output is a]
        cam_name = calls[conv_of[0]].name if conv_of else calls[a_i].name
        exposed.append(ExposedLayer(name=cam_name, exposed=calls[a_i].name, kind=calls[a_i].kind))
        order = {c.name: n for n, c in enumerate(calls)}
        exposed.sort(key=lambda e: order[e.exposed])

    # --- the final layer and the class scores -------------------------------------
    last = calls[-1]
    out_shape = last.output.shape
    if len(out_shape) != 2:
        raise ExportError(
            f"the model's output has shape {tuple(out_shape)}; convlens needs a classifier "
            "whose output is (batch, classes)"
        )
    units = int(out_shape[-1])
    if last.kind == "Dense":
        act = activation_name(last.layer.activation)
        final_mode = "dense" if act in ("softmax", "sigmoid") else "linear"
    elif last.kind in ("Activation", "Softmax"):
        act = "softmax" if last.kind == "Softmax" else activation_name(last.layer.activation)
        final_mode = "activation" if act in ("softmax", "sigmoid") else "linear"
    else:
        act, final_mode = "linear", "linear"
    if final_mode == "linear":
        act = "linear"
    binary = act == "sigmoid" and units == 1

    # --- the head between A and z ----------------------------------------------------
    end = last.output if final_mode == "linear" else last.input_tensors[0]
    problems = check_path(trace, a, end)
    head = [calls[i] for i in path_calls(trace, a, end)]
    k = int(a.shape[-1])
    head_kind, w, b = _cam_weights(trace, a_i, head, last, final_mode, k, units)
    if binary and w is not None and b is not None:
        w = np.concatenate([-w, w], axis=1)
        b = np.concatenate([-b, b])

    return Plan(
        exposed=exposed,
        cam_layer=cam_name,
        cam_exposed=calls[a_i].name,
        final=last.name,
        final_mode=final_mode,
        activation=act,
        units=units,
        binary_sigmoid=binary,
        head_kind=head_kind,
        head_calls=[c.name for c in head],
        gradient_problems=problems,
        cam_weights=w,
        cam_bias=b,
    )


def _cam_weights(
    trace: Trace, a_i: int, head: list[Call], last: Call, final_mode: str, k: int, units: int
) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """("gap_dense", W, b) when the scores are an affine map of GAP(A): GAP, then a
    linear Dense or 1x1 Conv2D (MobileNet's classifier) among identity/reshape layers;
    ("class_conv", I, 0) when A has one channel per class; else ("dense", None, None)."""
    calls = trace.calls
    chain = [calls[a_i], *head, *([last] if final_mode != "linear" else [])]
    for prev, c in zip(chain, chain[1:], strict=False):
        if len(c.input_tensors) != 1 or c.input_tensors[0] is not prev.output:
            return "dense", None, None
    core = [c for c in chain[1:] if c.kind not in (*IDENTITY_KINDS, "Flatten", "Reshape")]
    if not core or core[0].kind != "GlobalAveragePooling2D":
        return "dense", None, None
    rest = core[1:]
    if rest and rest[-1] is last and final_mode == "activation":
        rest = rest[:-1]
    if not rest and k == units:
        return "class_conv", np.eye(k, dtype=np.float32), np.zeros(units, np.float32)
    if len(rest) != 1:
        return "dense", None, None
    lin = rest[0]
    if activation_name(getattr(lin.layer, "activation", None)) not in ("linear",) and not (
        lin is last and final_mode == "dense"
    ):
        return "dense", None, None
    if lin.kind == "Dense":
        kernel = np.asarray(lin.weights[0], np.float32)
    elif (
        lin.kind == "Conv2D"
        and tuple(lin.layer.kernel_size) == (1, 1)
        and int(getattr(lin.layer, "groups", 1) or 1) == 1
    ):
        kernel = np.asarray(lin.weights[0], np.float32)[0, 0]
    else:
        return "dense", None, None
    if kernel.shape != (k, units):
        return "dense", None, None
    bias = (
        np.asarray(lin.weights[1], np.float32)
        if getattr(lin.layer, "use_bias", False)
        else np.zeros(units, np.float32)
    )
    return "gap_dense", kernel, bias


def scores_from_trace(tf: Any, plan: Plan, trace: Trace) -> tuple[Any, Any, Any]:
    """``(z, scores, predictions)`` recomputed from a trace, consistently with the plan.

    z is the pre-activation (N, units); scores (N, C) are the class scores (for a single
    sigmoid unit, [-z, z]); predictions (N, C) the probabilities ([1-p, p] likewise).
    """
    by_name = {c.name: c for c in trace.calls}
    last = by_name[plan.final]
    x = last.inputs[0] if isinstance(last.inputs, (list, tuple)) else last.inputs
    if plan.final_mode == "dense":
        z = tf.matmul(x, tf.convert_to_tensor(last.layer.kernel))
        if last.layer.use_bias:
            z = z + tf.convert_to_tensor(last.layer.bias)
    elif plan.final_mode == "activation":
        z = x
    else:
        z = last.output
    y = last.output
    if plan.binary_sigmoid:
        return z, tf.concat([-z, z], axis=1), tf.concat([1.0 - y, y], axis=1)
    return z, z, y
