"""tf2onnx conversion of the analysis tf.function, and the ONNX graph fixes after it.

The function is frozen to a GraphDef with its larger weights held out (tf2onnx copies
every constant many times over while it optimises); after conversion the held-out
weights stay references to their variables (:mod:`.weights`) until the file is
written, with their layout ops folded into them; eagerly computed constants a layer
captured become initializers; byte-identical weights are merged; and the graph's inputs
are checked to be the image and targets only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convlens.engine import contract as C

from .errors import ExportError
from .weights import HELD_OUT_ELEMENTS, Deferred, dedupe, fold_layouts, variable_reader

OPSET = 17


@dataclass
class Converted:
    """The converted graph and its weights not yet read (they enter the file when
    :func:`.weights.stream_model` writes it)."""

    proto: Any
    deferred: dict[str, Deferred] = field(default_factory=dict)

    def dedupe(self) -> int:
        return dedupe(self.proto, self.deferred)


def convert(tf: Any, fn: Any, sig: list[Any], names: list[str]) -> Converted:
    """tf2onnx conversion, graph outputs renamed to ``names`` (in order)."""
    try:
        import tf2onnx
    except ImportError as exc:
        raise ExportError("exporting needs tf2onnx: pip install 'convlens[export]'") from exc
    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.CRITICAL)  # unsupported ops are reported below, together
    concrete = fn.get_concrete_function(*sig)
    try:
        graph_def, inputs, outputs, held = _frozen_graph_def(tf, concrete)
        model_proto, _ = tf2onnx.convert.from_graph_def(
            graph_def,
            input_names=inputs + list(held),
            output_names=outputs,
            opset=OPSET,
            tensors_to_rename={f"{s.name}:0": s.name for s in sig},
        )
        del graph_def
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise ExportError(
            f"tf2onnx could not convert the model: {msg[0] if msg else type(exc).__name__}"
        ) from exc
    finally:
        tf2onnx_log.setLevel(level)
    unconverted = unconverted_ops(model_proto)
    if unconverted:
        raise ExportError(
            "tf2onnx cannot convert these TensorFlow ops: "
            + "; ".join(f"{op} (in {', '.join(where[:3])})" for op, where in unconverted.items())
        )
    deferred = fold_captured_inputs(model_proto, concrete, held)
    fold_layouts(model_proto, deferred)
    graph = model_proto.graph
    if len(graph.output) != len(names):
        raise ExportError(
            f"internal: converted graph has {len(graph.output)} outputs, expected {len(names)}"
        )
    rename = {o.name: new for o, new in zip(graph.output, names, strict=True)}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for o in graph.output:
        o.name = rename[o.name]
    _name_dynamic_dims(graph)
    converted = Converted(model_proto, deferred)
    converted.dedupe()
    return converted


def _frozen_graph_def(
    tf: Any, concrete: Any
) -> tuple[Any, list[str], list[str], dict[str, Deferred]]:
    """The concrete function's GraphDef with its variables' values put in, each once.

    Each variable's ReadVariableOp becomes a Const (small weights, which tf2onnx folds
    into the ops that use them) or a Placeholder held out of tf2onnx (weights of 64K
    values or more, which tf2onnx would copy many times over while it optimises; a
    200 MB VGG16 took 10 GB).  A held-out weight is a :class:`Deferred` read of the
    variable, its values read only as the file is written.  Reading the values straight from the
    variables, rather than through TensorFlow's ``convert_variables_to_constants_v2``,
    keeps freezing from holding several copies of the weights (ConvNeXtTiny's 106 MB
    took 1 GB more); graphs that use variables in other ways still go through it.
    """
    graph_def = concrete.graph.as_graph_def(add_shapes=True)
    explicit = len(concrete.inputs) - len(concrete.captured_inputs)
    handles = {
        inner.name.split(":")[0]: outer
        for inner, outer in zip(concrete.inputs[explicit:], concrete.captured_inputs, strict=True)
        if outer.dtype == tf.resource
    }
    reads = [n for n in graph_def.node if n.op == "ReadVariableOp"]
    others = [
        n
        for n in graph_def.node
        if n.op != "ReadVariableOp" and any(i.lstrip("^").split(":")[0] in handles for i in n.input)
    ]
    if others or graph_def.library.function or any(n.input[0] not in handles for n in reads):
        return _converted_graph_def(tf, concrete)
    first: dict[str, str] = {}  # variable handle -> the read kept
    alias: dict[str, str] = {}  # a second read of the same variable -> the first
    held: dict[str, Deferred] = {}
    for node in reads:
        handle = node.input[0]
        if handle in first:
            alias[node.name] = first[handle]
            continue
        first[handle] = node.name
        dtype = node.attr["dtype"].type
        tf_dtype = tf.dtypes.as_dtype(dtype)
        read = variable_reader(tf, handles[handle], tf_dtype)
        value = read()  # a view of the variable's buffer, not a copy
        shapes = tf.compat.v1.AttrValue()
        if "_output_shapes" in node.attr:
            shapes.CopyFrom(node.attr["_output_shapes"])
        del node.input[:]
        node.attr.clear()
        node.attr["dtype"].type = dtype
        if value.size >= HELD_OUT_ELEMENTS:
            node.op = "Placeholder"
            held[f"{node.name}:0"] = Deferred(
                read, value.dtype, value.shape, key=id(handles[handle])
            )
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(value.shape).as_proto())
        else:
            node.op = "Const"
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        if shapes.ListFields():
            node.attr["_output_shapes"].CopyFrom(shapes)
    keep = [n for n in graph_def.node if n.name not in alias and n.name not in handles]
    for node in keep:
        for i, name in enumerate(node.input):
            ctrl = name.startswith("^")
            base, _, port = name.lstrip("^").partition(":")
            if base in alias:
                node.input[i] = ("^" if ctrl else "") + alias[base] + (f":{port}" if port else "")
    del graph_def.node[:]
    graph_def.node.extend(keep)
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs]
    return graph_def, inputs, outputs, held


def _converted_graph_def(
    tf: Any, concrete: Any
) -> tuple[Any, list[str], list[str], dict[str, Deferred]]:
    """:func:`_frozen_graph_def` through TensorFlow's own freezing, for graphs that
    use their variables other than by plain reads (nested functions)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(
        concrete, lower_control_flow=False, aggressive_inlining=True
    )
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    held: dict[str, Deferred] = {}
    for node in graph_def.node:
        if node.op != "Const":
            continue
        dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
        if int(np.prod(dims)) < HELD_OUT_ELEMENTS:
            continue
        value = tf.make_ndarray(node.attr["value"].tensor)
        held[f"{node.name}:0"] = Deferred.of(value)
        dtype = node.attr["dtype"].type
        node.op = "Placeholder"
        node.attr.clear()
        node.attr["dtype"].type = dtype
        node.attr["shape"].shape.CopyFrom(tf.TensorShape(dims).as_proto())
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs]
    return graph_def, inputs, outputs, held


def fold_captured_inputs(
    model_proto: Any, concrete: Any, held: dict[str, Deferred] | None = None
) -> dict[str, Deferred]:
    """Take every graph input other than the image and targets out of the inputs.

    ``held`` are the weights :func:`_frozen_graph_def` kept away from tf2onnx: they
    are returned, by their names in the graph, still unread.  tf2onnx turns tensors a
    tf.function captured from eager code (a Normalization layer's mean and variance)
    into extra graph inputs that nobody can feed; their values are the concrete
    function's captured inputs, and become initializers.  Anything else left over is
    named, with the layer it belongs to.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    held = held or {}
    wanted = {C.IN_IMAGE, C.IN_TARGETS}
    extra = [i for i in graph.input if i.name not in wanted]
    deferred: dict[str, Deferred] = {}
    if not extra:
        return deferred
    explicit = len(concrete.inputs) - len(concrete.captured_inputs)
    values: dict[str, np.ndarray] = {}
    for inner, outer in zip(concrete.inputs[explicit:], concrete.captured_inputs, strict=True):
        if outer.dtype.name == "resource":
            continue
        values[inner.name] = np.asarray(outer.numpy())
        values[inner.name.split(":")[0]] = values[inner.name]
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    leaked = []
    for vi in extra:
        weight = held.get(vi.name)
        value = values.get(vi.name, values.get(vi.name.split(":")[0]))
        if weight is not None:
            deferred[vi.name] = weight
        elif value is not None:
            graph.initializer.append(numpy_helper.from_array(value, vi.name))
        else:
            where = consumers.get(vi.name, [vi.name])
            leaked.append(f"{vi.name} (used by {_layer_of(where[0])})")
            continue
        graph.input.remove(vi)
    if leaked:
        raise ExportError(
            "the converted graph needs inputs other than the image: " + "; ".join(leaked)
        )
    return deferred


def unconverted_ops(model_proto: Any) -> dict[str, list[str]]:
    """Ops tf2onnx left as TensorFlow ops (no ONNX schema): op type -> node names."""
    import onnx

    found: dict[str, list[str]] = {}
    for node in model_proto.graph.node:
        domain = node.domain or ""
        if domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, domain):
            found.setdefault(node.op_type, []).append(_layer_of(node.name))
    return found


def _layer_of(node_name: str) -> str:
    parts = node_name.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else node_name


def _name_dynamic_dims(graph: Any) -> None:
    """tf2onnx names dynamic dims unk__N; call them batch and targets."""
    per_target = {C.IN_TARGETS, C.OUT_GRADIENTS, C.OUT_TARGET_INDICES}
    for vi in list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                continue
            if i == 0:
                d.dim_param = "batch"
            elif i == 1 and vi.name in per_target:
                d.dim_param = "targets"


def add_constant_output(model_proto: Any, name: str, value: np.ndarray) -> None:
    """Expose a constant (e.g. the dense weights) as a graph output via Identity."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    init_name = name + "__const"
    graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), init_name))
    graph.node.append(helper.make_node("Identity", [init_name], [name], name=name + "__out"))
    graph.output.append(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape))
    )
