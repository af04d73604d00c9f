"""Engine-side changes to an analysis graph, made in memory when a session opens.

- Per-channel activation statistics (sum, max, number of zeros over positions) are added
  as reductions inside the graph, so onnxruntime computes them with its own kernels on
  the device where the activations live, and the full activation tensors only leave
  the session for the images a sink asks them for.  With ``rows=True`` they are taken
  over the first ``m`` batch rows only, ``m`` given by an extra int64 input
  :data:`STATS_ROWS` of shape (1,) (``Slice`` first; the engine puts the sampled images
  first in the batch): a run that samples its statistics (``--stats-every``) pays the
  reductions for the sampled images alone (a batch without one is not asked for them).
  A ``Slice`` of leading rows is a cheap contiguous copy on either runtime; a ``Gather``
  of arbitrary rows cost OpenVINO's CPU plugin more than reducing every row (VGG16,
  bf16: 34 against 24 ms an image), as it reorders its blocked layout.
- The graph is pruned to the outputs a session will be asked for: onnxruntime runs
  every node of a graph whatever outputs are requested, so an unused output (say the
  NHWC copy of every activation, or the gradients when no gradient method is chosen)
  would cost on every batch (small benchmark model: the whole analysis graph asked for
  its predictions alone took 3.3 ms an image, pruned to them 2.55).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import contract as C
from . import onnxproto as P

STATS_PREFIX = "stats/"
#: with_stats(rows=True): the graph input ``[m]``: the statistics cover the batch's first m rows
STATS_ROWS = "convlens_stats_rows"


#: with_stats(act_rows=True): the graph inputs ``[a]`` and ``[b]``: the batch rows a to
#: b - 1 whose activations come out of the main session; and the prefix of those outputs'
#: names
ACT_ROWS = ("convlens_act_rows_first", "convlens_act_rows_end")
ACT_ROWS_PREFIX = "rows/"
#: the inputs that hold a batch row position ([m], [a], [b]): a part of a batch run on
#: its own counts them from its first row (convlens.engine.infer.Inference._run_main)
ROW_POSITIONS = (STATS_ROWS, *ACT_ROWS)


def stat_names(layer: str) -> tuple[str, str, str]:
    base = STATS_PREFIX + layer
    return base + "/sum", base + "/max", base + "/zeros"


def _load(source: str | Path | Any) -> Any:
    """A ModelProto to modify: loaded from a path, or a copy of one already loaded."""
    if isinstance(source, (str, Path)):
        return P.load(source)
    model = P.ModelProto()
    model.CopyFrom(source)
    return model


def with_stats(
    source: str | Path | Any,
    spec: C.ModelSpec,
    keep: list[str] | None = None,
    rows: bool = False,
    act_rows: bool = False,
) -> bytes:
    """The model with ``stats/<layer>/{sum,max,zeros}`` outputs, each (N, k) float32;
    with ``keep``, pruned to those outputs (stats names included); with ``rows``, over
    the first ``m`` rows, :data:`STATS_ROWS` = ``[m]``, (m, k); with ``act_rows``, also
    :func:`add_act_rows`' outputs (name them in ``keep``)."""
    model = _load(source)
    add_stats(model, spec, rows)
    if act_rows:
        add_act_rows(model, spec)
    if keep is not None:
        prune(model, keep)
    return bytes(model.SerializeToString())


def pruned(source: str | Path | Any, keep: list[str]) -> bytes:
    """The model pruned to the outputs ``keep``."""
    model = _load(source)
    prune(model, keep)
    return bytes(model.SerializeToString())


def prune(model: Any, keep: list[str]) -> None:
    """Keep only the nodes, initializers and inputs that the outputs ``keep`` need."""
    g = model.graph
    missing = set(keep) - {o.name for o in g.output}
    if missing:
        raise KeyError(f"no graph output {sorted(missing)}")
    need = set(keep)
    nodes = []
    for node in reversed(list(g.node)):
        if any(o in need for o in node.output):
            nodes.append(node)
            need.update(i for i in node.input if i)
    nodes.reverse()
    outputs = [o for o in g.output if o.name in keep]
    inits = [i for i in g.initializer if i.name in need]
    inputs = [i for i in g.input if i.name in need]
    del g.node[:], g.output[:], g.initializer[:], g.input[:]
    g.node.extend(nodes)
    g.output.extend(outputs)
    g.initializer.extend(inits)
    g.input.extend(inputs)


def _nchw_source(producers: dict[str, Any], name: str) -> str | None:
    """If ``name`` is a Transpose NCHW -> NHWC (how tf2onnx hands out conv outputs),
    the NCHW tensor: reducing that one lets pruning drop the Transpose."""
    node = producers.get(name)
    if node is None or node.op_type != "Transpose":
        return None
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return str(node.input[0]) if perm == [[0, 2, 3, 1]] else None


def act_row_names(spec: C.ModelSpec) -> list[str]:
    """:func:`add_act_rows`' outputs, one per activation output."""
    return [ACT_ROWS_PREFIX + o.name for o in spec.activation_outputs]


def act_rows_nchw(model: Any, spec: C.ModelSpec) -> list[bool]:
    """For each of :func:`add_act_rows`' outputs, whether it is NCHW ``(r, k, h, w)``
    (tf2onnx made the activation output a transpose of an NCHW tensor) rather than
    NHWC ``(r, h, w, k)``."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return [_nchw_source(producers, o.name) is not None for o in spec.activation_outputs]


def add_act_rows(model: Any, spec: C.ModelSpec) -> None:
    """Add ``rows/act/<layer>`` outputs: each activation output of just the batch rows
    ``a`` to ``b - 1``, the int64 inputs :data:`ACT_ROWS` being ``[a]`` and ``[b]`` (the
    engine puts those rows next to each other), sliced from the NCHW tensor where tf2onnx
    made the output a transpose of one (:func:`act_rows_nchw`; the reader transposes a
    view: an NHWC copy in the graph cost 250 MB of peak memory on the small benchmark
    model).  The main session then hands out the activations of the images whose grids
    are certain with the pass it makes anyway, instead of a second pass over the network
    for them.  A ``Gather`` of arbitrary rows cost OpenVINO's CPU plugin 14 ms an image
    on every VGG16 bf16 batch, even with no row named (37 against 23); a ``Slice`` of no
    row costs nothing."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    first, end = ACT_ROWS
    for name in ACT_ROWS:
        graph.input.append(P.make_tensor_value_info(name, P.TensorProto.INT64, [1]))
    axes = f"{first}/axes"
    graph.initializer.append(P.from_array(np.array([0], np.int64), axes))
    for out, name in zip(spec.activation_outputs, act_row_names(spec), strict=True):
        h, w, k = (int(v) for v in out.shape[1:])
        nchw = _nchw_source(producers, out.name)
        graph.node.append(P.make_node("Slice", [nchw or out.name, first, end, axes], [name]))
        shape: list[str | int] = ["r", k, h, w] if nchw else ["r", h, w, k]
        graph.output.append(P.make_tensor_value_info(name, P.TensorProto.FLOAT, shape))


def add_stats(model: Any, spec: C.ModelSpec, rows: bool = False) -> None:
    """Add ``stats/<layer>/{sum,max,zeros}`` outputs: per image and channel (N, k), the
    sum, the maximum and the number of exact zeros over all positions; with ``rows``,
    of the first ``m`` images only, ``Slice(act, [0], STATS_ROWS = [m], [0])``."""
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    producers = {o: n for n in graph.node for o in n.output}
    zero_name = "convlens_stats_zero"
    graph.initializer.append(P.from_array(np.array(0.0, np.float32), zero_name))
    for axes in ((1, 2), (2, 3)):
        graph.initializer.append(
            P.from_array(np.array(axes, np.int64), f"convlens_stats_axes{axes[0]}{axes[1]}")
        )
    first = "convlens_stats_first"  # Slice's starts and axes alike: [0]
    if rows:
        graph.input.append(P.make_tensor_value_info(STATS_ROWS, P.TensorProto.INT64, [1]))
        graph.initializer.append(P.from_array(np.array([0], np.int64), first))
    for out in spec.activation_outputs:
        assert out.layer is not None
        s_sum, s_max, s_zero = stat_names(out.layer)
        k = out.shape[-1]
        src = _nchw_source(producers, out.name)
        axes = (2, 3) if src else (1, 2)
        src = src or out.name
        axes_name = f"convlens_stats_axes{axes[0]}{axes[1]}"
        eq, cast = s_zero + "/eq", s_zero + "/cast"
        nodes = []
        if rows:
            nodes.append(P.make_node("Slice", [src, first, STATS_ROWS, first], [s_sum + "/rows"]))
            src = s_sum + "/rows"
        nodes += [
            P.make_node("ReduceSum", [src, axes_name], [s_sum], keepdims=0),
            P.make_node("Equal", [src, zero_name], [eq]),
            P.make_node("Cast", [eq], [cast], to=P.TensorProto.FLOAT),
            P.make_node("ReduceSum", [cast, axes_name], [s_zero], keepdims=0),
        ]
        if opset >= 18:
            nodes.append(P.make_node("ReduceMax", [src, axes_name], [s_max], keepdims=0))
        else:
            nodes.append(P.make_node("ReduceMax", [src], [s_max], axes=list(axes), keepdims=0))
        graph.node.extend(nodes)
        for name in (s_sum, s_max, s_zero):
            graph.output.append(P.make_tensor_value_info(name, P.TensorProto.FLOAT, ["batch", k]))
