"""tf2onnx conversion of the analysis tf.function, and the ONNX graph fixes after it.

The function is frozen to a GraphDef with its larger weights held out (tf2onnx copies
every constant many times over while it optimises); after conversion the held-out
weights and any eagerly computed constants a layer captured come back as initializers,
their layout ops are folded once with numpy, byte-identical initializers are merged,
and the graph's inputs are checked to be the image and targets only.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from typing import Any

import numpy as np

from convlens.engine import contract as C

from .errors import ExportError

OPSET = 17


def convert(tf: Any, fn: Any, sig: list[Any], names: list[str]) -> Any:
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
    fold_captured_inputs(model_proto, concrete, held)
    fold_weight_layouts(model_proto)
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
    dedupe_initializers(model_proto)
    return model_proto


HELD_OUT_ELEMENTS = 1 << 16  # weights this large bypass tf2onnx (64K floats, 256 KB)


def _frozen_graph_def(
    tf: Any, concrete: Any
) -> tuple[Any, list[str], list[str], dict[str, np.ndarray]]:
    """The concrete function's GraphDef with its variables' values put in, each once.

    Each variable's ReadVariableOp becomes a Const (small weights, which tf2onnx folds
    into the ops that use them) or a Placeholder held out of tf2onnx (weights of 64K
    values or more, which tf2onnx would copy many times over while it optimises; a
    200 MB VGG16 took 10 GB).  A held-out weight is the variable's own buffer, put
    back as one initializer after conversion.  Reading the values straight from the
    variables, rather than through TensorFlow's ``convert_variables_to_constants_v2``,
    keeps freezing from holding several copies of the weights (ConvNeXtTiny's 106 MB
    took 1 GB more); graphs that use variables in other ways still go through it.
    """
    from tensorflow.python.ops import gen_resource_variable_ops

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
    held: dict[str, np.ndarray] = {}
    for node in reads:
        handle = node.input[0]
        if handle in first:
            alias[node.name] = first[handle]
            continue
        first[handle] = node.name
        dtype = node.attr["dtype"].type
        value = gen_resource_variable_ops.read_variable_op(
            handles[handle], tf.dtypes.as_dtype(dtype)
        ).numpy()
        shapes = tf.compat.v1.AttrValue()
        if "_output_shapes" in node.attr:
            shapes.CopyFrom(node.attr["_output_shapes"])
        del node.input[:]
        node.attr.clear()
        node.attr["dtype"].type = dtype
        if value.size >= HELD_OUT_ELEMENTS:
            node.op = "Placeholder"
            held[f"{node.name}:0"] = value
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
) -> tuple[Any, list[str], list[str], dict[str, np.ndarray]]:
    """:func:`_frozen_graph_def` through TensorFlow's own freezing, for graphs that
    use their variables other than by plain reads (nested functions)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(
        concrete, lower_control_flow=False, aggressive_inlining=True
    )
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    held: dict[str, np.ndarray] = {}
    for node in graph_def.node:
        if node.op != "Const":
            continue
        dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
        if int(np.prod(dims)) < HELD_OUT_ELEMENTS:
            continue
        held[f"{node.name}:0"] = tf.make_ndarray(node.attr["value"].tensor)
        dtype = node.attr["dtype"].type
        node.op = "Placeholder"
        node.attr.clear()
        node.attr["dtype"].type = dtype
        node.attr["shape"].shape.CopyFrom(tf.TensorShape(dims).as_proto())
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs]
    return graph_def, inputs, outputs, held


def fold_weight_layouts(model_proto: Any) -> int:
    """Fold the layout ops tf2onnx put on held-out weights (Transpose HWIO -> OIHW,
    Reshape, Squeeze, Unsqueeze, Identity) into new initializers, once, with numpy;
    initializers left unused are dropped.  Returns how many nodes were folded."""
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    readers = collections.Counter(n for node in graph.node for n in node.input)
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.node):
            if node.op_type not in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"):
                continue
            if not node.input or not all(n in inits for n in node.input if n):
                continue
            if node.output[0] in outputs:
                continue
            x = numpy_helper.to_array(inits[node.input[0]])
            attrs = {a.name: a for a in node.attribute}
            if node.op_type == "Transpose":
                perm = list(attrs["perm"].ints) if "perm" in attrs else None
                y = np.ascontiguousarray(np.transpose(x, perm))
            elif node.op_type == "Reshape":
                shape = numpy_helper.to_array(inits[node.input[1]]).tolist()
                y = x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
            elif node.op_type in ("Squeeze", "Unsqueeze"):
                if len(node.input) > 1:
                    axes = numpy_helper.to_array(inits[node.input[1]]).tolist()
                else:
                    axes = list(attrs["axes"].ints)
                y = np.squeeze(x, tuple(axes)) if node.op_type == "Squeeze" else x
                if node.op_type == "Unsqueeze":
                    for ax in sorted(a % (x.ndim + len(axes)) for a in axes):
                        y = np.expand_dims(y, ax)
            else:
                y = x
            new = numpy_helper.from_array(y.astype(x.dtype, copy=False), node.output[0])
            del x, y
            graph.initializer.append(new)
            inits[new.name] = new
            graph.node.remove(node)
            for name in node.input:  # an initializer nothing else reads goes now, not
                readers[name] -= 1  # at the end, so that two copies are never held
                if name and name in inits and readers[name] <= 0 and name not in outputs:
                    graph.initializer.remove(inits.pop(name))
            folded += 1
            changed = True
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return folded


def fold_captured_inputs(
    model_proto: Any, concrete: Any, held: dict[str, np.ndarray] | None = None
) -> None:
    """Make every graph input other than the image and targets an initializer.

    ``held`` are the weights :func:`_frozen_graph_def` kept away from tf2onnx; each
    leaves the dict as it becomes an initializer, so that only one copy is ever held.
    tf2onnx turns tensors a tf.function captured from eager code (a Normalization
    layer's mean and variance) into extra graph inputs that nobody can feed; their
    values are the concrete function's captured inputs.  Anything else left over is
    named, with the layer it belongs to.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    wanted = {C.IN_IMAGE, C.IN_TARGETS}
    extra = [i for i in graph.input if i.name not in wanted]
    if not extra:
        return
    explicit = len(concrete.inputs) - len(concrete.captured_inputs)
    values: dict[str, np.ndarray] = held if held is not None else {}
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
        value = values.get(vi.name, values.get(vi.name.split(":")[0]))
        if value is None:
            where = consumers.get(vi.name, [vi.name])
            leaked.append(f"{vi.name} (used by {_layer_of(where[0])})")
            continue
        graph.initializer.append(numpy_helper.from_array(value, vi.name))
        graph.input.remove(vi)
        values.pop(vi.name, None)  # the initializer is now the only copy we hold
        del value
    if leaked:
        raise ExportError(
            "the converted graph needs inputs other than the image: " + "; ".join(leaked)
        )


def dedupe_initializers(model_proto: Any) -> int:
    """Merge byte-identical initializers (the backward rules embed a second copy of a
    dense kernel the forward pass already holds).  Returns how many were dropped."""
    from onnx import numpy_helper

    graph = model_proto.graph
    first: dict[tuple[Any, ...], str] = {}
    alias: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        key = (arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())
        if key in first:
            alias[init.name] = first[key]
        else:
            first[key] = init.name
            keep.append(init)
    if not alias:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph_inputs = {i.name for i in graph.input}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias and name not in graph_inputs:
                node.input[i] = alias[name]
    return len(alias)


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
