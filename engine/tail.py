"""The network after the CAM tensor (the "tail"), cut out of the analysis graph at run time.

Ablation-CAM and Recipro-CAM re-run only the layers after the CAM tensor, on perturbed
copies of it.  The analysis file stays one graph: when a run asks for such a method, the
engine cuts the tail out of that graph in memory (as ``onnx.utils.Extractor`` would, with
the CAM tensor as the new graph input) and opens a session on it, as it prunes the graph
per session anyway (:mod:`convlens.engine.graph`).  Nothing is exported twice, and every
analysis file already written serves these methods.

The cut is at the CAM tensor ``act/<layer>`` (NHWC) or at the tensor it was transposed from
(tf2onnx computes convolutions in NCHW and the head reads that tensor, not the NHWC copy
the file exposes): whichever of them the head reads becomes an input of the tail, fed the
perturbed features in its own layout.  Walking back from the class scores and the
predictions, every tensor must come from the CAM tensor or from constants: if the
predictions also read a tensor computed from the image some other way (a skip connection
around the CAM layer, say), the tail is refused with that tensor's name, and so are the
methods that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import contract as C
from . import onnxproto as P

#: what the tail computes, in this order
TAIL_OUTPUTS = (C.OUT_SCORES, C.OUT_PREDICTIONS)


class TailError(ValueError):
    """The tail cannot be cut out of this graph; ``str(e)`` is the one-line reason."""


@dataclass(frozen=True)
class TailGraph:
    """The tail as a serialized ONNX model and how to feed it feature maps."""

    model: bytes
    #: (graph input, layout of the features it takes: "NHWC" or "NCHW")
    inputs: tuple[tuple[str, str], ...]

    def feeds(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """The tail's inputs for feature maps ``feats`` ``(B, h, w, k)`` (NHWC)."""
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        return {
            name: feats if layout == "NHWC" else np.ascontiguousarray(feats.transpose(0, 3, 1, 2))
            for name, layout in self.inputs
        }


def _attr_ints(node: Any, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return None


def _cut_tensors(producers: dict[str, Any], cam: str) -> dict[str, str]:
    """The CAM tensor and the tensors it is a copy of (Identity) or an NHWC transpose of:
    name -> layout."""
    cut = {cam: "NHWC"}
    name, node = cam, producers.get(cam)
    while node is not None and node.op_type in ("Identity", "Transpose"):
        layout = cut[name]
        if node.op_type == "Transpose":
            if layout != "NHWC" or _attr_ints(node, "perm") != [0, 2, 3, 1]:
                break
            layout = "NCHW"
        name = str(node.input[0])
        cut[name] = layout
        node = producers.get(name)
    return cut


def _readable(tensor: str) -> str:
    return tensor[:-2] if tensor.endswith(":0") else tensor


def cut_tail(model: Any, spec: C.ModelSpec) -> TailGraph:
    """The tail of ``model`` (a loaded ModelProto): the CAM tensor (or its NCHW source) to
    the class scores and predictions; :class:`TailError` when it cannot be cut."""
    cam = spec.cam_output
    if cam is None:
        raise TailError("the file exposes no CAM tensor")
    if not all(spec.has_output(o) for o in TAIL_OUTPUTS):
        raise TailError("the file has no class scores output (re-export it)")
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    graph_inputs = {i.name for i in g.input} - inits
    if cam not in producers:
        raise TailError(f"no node computes the CAM tensor {cam}")
    cut = _cut_tensors(producers, cam)
    # nodes are topologically sorted: one pass each finds what the image (or targets)
    # reaches and what the CAM tensor reaches
    from_input, from_cam = set(graph_inputs), set(cut)
    for node in g.node:
        if any(i in from_input for i in node.input):
            from_input.update(node.output)
        if any(i in from_cam for i in node.input):
            from_cam.update(node.output)
    keep: set[int] = set()
    seen: set[str] = set()
    stack = list(TAIL_OUTPUTS)
    while stack:
        t = stack.pop()
        if not t or t in seen or t in cut or t in inits:
            continue
        seen.add(t)
        if t in graph_inputs or (t not in from_cam and t in from_input):
            raise TailError(
                f"the predictions depend on {_readable(t)!r} other than through the CAM "
                f"tensor of {spec.cam_layer} (a skip connection around it?)"
            )
        node = producers.get(t)
        if node is None:  # not a weight, not computed: a graph this cut cannot read
            raise TailError(f"the graph neither computes nor holds {_readable(t)!r}")
        keep.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in g.node if id(n) in keep]
    read = {i for n in nodes for i in n.input}
    used = [(name, layout) for name, layout in cut.items() if name in read]
    if not used:
        raise TailError(f"the predictions do not depend on the CAM tensor of {spec.cam_layer}")
    h, w, k = (int(d) for d in spec.output(cam).shape[1:])
    inputs = [
        P.make_tensor_value_info(
            name,
            P.TensorProto.FLOAT,
            ["batch", h, w, k] if layout == "NHWC" else ["batch", k, h, w],
        )
        for name, layout in used
    ]
    outputs = [o for o in g.output if o.name in TAIL_OUTPUTS]
    weights = [i for i in g.initializer if i.name in read]
    graph = P.make_graph(nodes, "convlens_tail", inputs, outputs, initializer=weights)
    tail = P.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return TailGraph(tail.SerializeToString(), tuple(used))


def tail_problem(model: Any, spec: C.ModelSpec) -> str | None:
    """Why the tail cannot be cut out of ``model``, or None when it can."""
    try:
        cut_tail(model, spec)
    except TailError as exc:
        return str(exc)
    return None
