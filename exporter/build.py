"""Build the analysis tf.function from a plan and convert it to ONNX with tf2onnx."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from convlens.engine import contract as C

from .backward import Ops, backward, matmul_t
from .errors import ExportError, UnsupportedHead
from .plan import Plan, scores_from_trace
from .trace import Recorder, Trace

OPSET = 17


def resolve_targets(tf: Any, scores: Any, targets: Any) -> Any:
    """Targets (N, T): >= 0 class index, -r the r-th best class.  Returns int64 (N, T)."""
    n_cls = scores.shape[-1]
    order = tf.argsort(scores, axis=1, direction="DESCENDING")  # (N, C)
    rank = tf.clip_by_value(-targets - 1, 0, n_cls - 1)
    ranked = tf.reduce_sum(
        tf.one_hot(rank, n_cls, dtype=tf.float32) * tf.cast(order[:, None, :], tf.float32),
        axis=-1,
    )
    ranked = tf.cast(tf.round(ranked), tf.int64)
    direct = tf.clip_by_value(targets, 0, n_cls - 1)
    return tf.where(targets < 0, ranked, direct)


def head_gradients(tf: Any, plan: Plan, trace: Trace, scores: Any, resolved: Any) -> Any:
    """d scores[n, resolved[n, t]] / d A, shape (N, T, h, w, k), by the registered rules."""
    by_name = {c.name: c for c in trace.calls}
    n_cls = plan.num_classes
    seed = tf.one_hot(resolved, n_cls, dtype=scores.dtype)  # (N, T, C) on scores
    g = seed[..., 1:2] - seed[..., 0:1] if plan.binary_sigmoid else seed  # on z
    last = by_name[plan.final]
    nt = tf.shape(resolved)[:2]
    if plan.final_mode == "dense":
        g = matmul_t(Ops(tf, nt), g, tf.convert_to_tensor(last.layer.kernel))
    end = last.output if plan.final_mode == "linear" else last.input_tensors[0]
    return backward(tf, trace, by_name[plan.cam_exposed].output, end, g, nt)


def probe_gradients(tf: Any, plan: Plan, trace: Trace) -> None:
    """Run the head's backward rules once, eagerly, on a recorded trace: layers whose
    configuration no rule covers (e.g. ReLU(max_value=6), overlapping pooling) are
    added to ``plan.gradient_problems`` instead of failing the conversion later."""
    if not plan.gradients_available:
        return
    try:
        _, scores, _ = scores_from_trace(tf, plan, trace)
        resolved = tf.zeros((scores.shape[0], 1), dtype=tf.int64)
        head_gradients(tf, plan, trace, scores, resolved)
    except UnsupportedHead as exc:
        plan.gradient_problems.extend(exc.problems)


def output_names(plan: Plan, with_gradients: bool) -> list[str]:
    names = [C.OUT_PREDICTIONS, C.OUT_SCORES]
    names += [C.ACT_PREFIX + e.name for e in plan.exposed]
    if with_gradients:
        names += [C.OUT_GRADIENTS, C.OUT_TARGET_INDICES]
    return names


def make_function(
    tf: Any,
    model: Any,
    recorder: Recorder,
    plan: Plan,
    input_shape: tuple[int, int, int],
    with_gradients: bool,
    plain: bool = False,
) -> tuple[Any, list[Any]]:
    """The analysis tf.function and its input signature.

    ``plain=True`` gives the model's predictions only (the baseline export).
    """
    image_spec = tf.TensorSpec([None, *input_shape], tf.float32, name=C.IN_IMAGE)
    target_spec = tf.TensorSpec([None, None], tf.int64, name=C.IN_TARGETS)

    def outputs(image: Any, targets: Any | None) -> list[Any]:
        with recorder.recording(rewrite_with=tf) as trace:
            y = model(image, training=False)
        if plain:
            return [y]
        by_name = {c.name: c for c in trace.calls}
        _, scores, preds = scores_from_trace(tf, plan, trace)
        outs = [preds, scores]
        outs += [by_name[e.exposed].output for e in plan.exposed]
        if targets is not None:
            resolved = resolve_targets(tf, scores, targets)
            outs += [head_gradients(tf, plan, trace, scores, resolved), resolved]
        return outs

    if with_gradients and not plain:
        sig = [image_spec, target_spec]

        @tf.function(input_signature=sig)
        def fn2(image: Any, targets: Any) -> list[Any]:
            return outputs(image, targets)

        return fn2, sig

    sig = [image_spec]

    @tf.function(input_signature=sig)
    def fn1(image: Any) -> list[Any]:
        return outputs(image, None)

    return fn1, sig


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
    """The concrete function frozen to a GraphDef, with its largest constants (VGG's
    fully connected kernels) held out as placeholders.

    tf2onnx copies every constant many times over while it optimises (a 200 MB VGG16
    took 10 GB); a held-out weight is one numpy array, put back as an initializer
    after conversion.  Only constants that feed no transposition are large enough in
    practice: dense kernels, which MatMul reads as they are.
    """
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
        node.attr["shape"].shape.CopyFrom(
            tf.TensorShape(dims).as_proto()  # static shape, for tf2onnx's shape inference
        )
    # the image, the targets, and eager tensors the function captured (folded later)
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
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.node):
            if node.op_type not in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"):
                continue
            if not node.input or not all(n in inits for n in node.input if n):
                continue
            if any(o.name == node.output[0] for o in graph.output):
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
            graph.initializer.append(new)
            inits[new.name] = new
            graph.node.remove(node)
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

    ``held`` are the weights :func:`_frozen_graph_def` kept away from tf2onnx.  tf2onnx turns tensors a tf.function captured from eager code (a Normalization
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
    values: dict[str, np.ndarray] = dict(held or {})
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
    if leaked:
        raise ExportError(
            "the converted graph needs inputs other than the image: " + "; ".join(leaked)
        )


def dedupe_initializers(model_proto: Any) -> int:
    """Merge byte-identical initializers (the backward rules embed a second copy of a
    dense kernel the forward pass already holds).  Returns how many were dropped."""
    import hashlib

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


def tape_gradients(
    tf: Any,
    model: Any,
    recorder: Recorder,
    plan: Plan,
    images: np.ndarray,
    classes: np.ndarray,
) -> np.ndarray:
    """Reference d scores[class] / d A by tf.GradientTape through the real Keras layers."""
    result = []
    x = tf.constant(images, dtype=tf.float32)
    for t in range(classes.shape[1]):
        with tf.GradientTape() as tape:
            held: dict[str, Any] = {}
            hook = functools.partial(_watch, tape, held)
            with recorder.recording(hooks={plan.cam_exposed: hook}) as trace:
                model(x, training=False)
            _, scores, _ = scores_from_trace(tf, plan, trace)
            sel = tf.reduce_sum(scores * tf.one_hot(classes[:, t], scores.shape[-1]), axis=1)
        grad = tape.gradient(sel, held["a"])
        result.append(np.asarray(grad))
    return np.stack(result, axis=1)


def _watch(tape: Any, held: dict[str, Any], out: Any) -> Any:
    tape.watch(out)
    held["a"] = out
    return out
