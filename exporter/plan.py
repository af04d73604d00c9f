"""Decide what an analysis export contains: exposed conv layers, the CAM layer, the head.

The plan is made from one eager trace of the model and refers to layers by name, so it
can be re-applied to every later trace (inside tf.function, under a GradientTape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backward import activation_name, check_head
from .errors import ExportError
from .trace import CONV_KINDS, IDENTITY_KINDS, POST_CONV_KINDS, Call, Trace


@dataclass
class ExposedLayer:
    """A conv layer and the call whose output is exposed (the conv, or its BN/activation)."""

    conv: str
    exposed: str
    kind: str


@dataclass
class Plan:
    exposed: list[ExposedLayer]
    cam_layer: str  # conv name
    cam_exposed: str  # call name whose output is A
    final: str  # name of the last call
    final_mode: str  # "dense" (recompute z = xW+b), "activation" (z = input), "linear" (z = output)
    activation: str  # softmax | sigmoid | linear
    units: int
    binary_sigmoid: bool
    head_kind: str  # gap_dense | class_conv | dense
    head_calls: list[str]  # calls between A and z (exclusive of the final dense/activation)
    gradient_problems: list[str] = field(default_factory=list)
    cam_weights: np.ndarray | None = None
    cam_bias: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return 2 if self.binary_sigmoid else self.units

    @property
    def gradients_available(self) -> bool:
        return not self.gradient_problems


def _exposed_index(calls: list[Call], i: int) -> int:
    j = i
    while (
        j + 1 < len(calls)
        and calls[j + 1].kind in POST_CONV_KINDS
        and _feeds(calls[j], calls[j + 1])
    ):
        j += 1
    return j


def _feeds(a: Call, b: Call) -> bool:
    x = b.inputs
    if isinstance(x, (list, tuple)):
        return len(x) == 1 and x[0] is a.output
    return x is a.output


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
    conv_names = [calls[i].name for i in convs]
    for i in convs:
        if len(calls[i].output.shape) != 4:
            raise ExportError(f"layer {calls[i].name}: only 2-D convolutions are supported")

    if layers:
        unknown = [n for n in layers if n not in conv_names]
        if unknown:
            raise ExportError(
                f"--layers: no convolution layer named {', '.join(unknown)}; "
                f"the model's are: {', '.join(conv_names)}"
            )
    chosen = [i for i in convs if not layers or calls[i].name in layers]

    if cam_layer is None:
        cam_i = convs[-1]
    else:
        if cam_layer not in conv_names:
            raise ExportError(
                f"--cam-layer: no convolution layer named {cam_layer}; "
                f"the model's are: {', '.join(conv_names)}"
            )
        cam_i = conv_names.index(cam_layer)
        cam_i = convs[cam_i]
    if cam_i not in chosen:
        chosen.append(cam_i)
        chosen.sort()

    exposed = [
        ExposedLayer(
            conv=calls[i].name, exposed=calls[_exposed_index(calls, i)].name, kind=calls[i].kind
        )
        for i in chosen
    ]
    a_i = _exposed_index(calls, cam_i)

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
    end = len(calls) if final_mode == "linear" else len(calls) - 1
    problems: list[str] = []
    if not trace.chain_ok(a_i):
        problems.append(
            f"the layers after {calls[a_i].name} are not a single chain (branches or skip "
            "connections after the CAM layer)"
        )
    head = calls[a_i + 1 : end]
    problems += check_head(head)

    # layers that do not change a (N, k) vector after global pooling do not matter here
    core = [c for c in calls[a_i + 1 :] if c.kind not in (*IDENTITY_KINDS, "Flatten", "Reshape")]
    k = int(calls[a_i].output.shape[-1])
    head_kind = "dense"
    w = b = None
    if core and core[0].kind == "GlobalAveragePooling2D" and trace.chain_ok(a_i):
        rest = core[1:]
        dense = None
        if len(rest) == 1 and rest[0].kind == "Dense" and rest[0] is last:
            dense = last  # GAP -> Dense(softmax/sigmoid/linear)
        elif (
            len(rest) == 2
            and rest[0].kind == "Dense"
            and activation_name(rest[0].layer.activation) == "linear"
            and rest[1] is last
            and final_mode == "activation"
        ):
            dense = rest[0]  # GAP -> Dense(linear) -> Activation/Softmax
        if dense is not None:
            head_kind = "gap_dense"
            w = np.asarray(dense.weights[0], dtype=np.float32)
            b = (
                np.asarray(dense.weights[1], dtype=np.float32)
                if dense.layer.use_bias
                else np.zeros(units, np.float32)
            )
        elif (
            not rest or (len(rest) == 1 and rest[0] is last and final_mode == "activation")
        ) and k == units:
            head_kind = "class_conv"
            w = np.eye(k, dtype=np.float32)
            b = np.zeros(units, np.float32)
    if binary and w is not None and b is not None:
        w = np.concatenate([-w, w], axis=1)
        b = np.concatenate([-b, b])

    return Plan(
        exposed=exposed,
        cam_layer=calls[cam_i].name,
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


def scores_from_trace(tf: Any, plan: Plan, trace: Trace) -> tuple[Any, Any, Any]:
    """``(z, scores, predictions)`` recomputed from a trace, consistently with the plan.

    z is the pre-activation (N, units); scores (N, C) are the class scores (for a single
    sigmoid unit, [-z, z]); predictions (N, C) the probabilities ([1-p, p] likewise).
    """
    by_name = {c.name: c for c in trace.calls}
    last = by_name[plan.final]
    x = last.inputs[0] if isinstance(last.inputs, (list, tuple)) else last.inputs
    if plan.final_mode == "dense":
        weights = last.weights
        z = tf.matmul(x, tf.constant(weights[0]))
        if last.layer.use_bias:
            z = z + tf.constant(weights[1])
    elif plan.final_mode == "activation":
        z = x
    else:
        z = last.output
    y = last.output
    if plan.binary_sigmoid:
        return z, tf.concat([-z, z], axis=1), tf.concat([1.0 - y, y], axis=1)
    return z, z, y
