"""Engine-side additions to an analysis graph, made in memory when the session opens.

Per-channel activation statistics (sum, max, number of zeros over positions) are added
as reductions inside the graph, so onnxruntime computes them with its own kernels on
the device where the activations live, and the full activation tensors only leave the
session for the images a sink asks them for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import contract as C

STATS_PREFIX = "stats/"


def stat_names(layer: str) -> tuple[str, str, str]:
    base = STATS_PREFIX + layer
    return base + "/sum", base + "/max", base + "/zeros"


def with_stats(path: str | Path, spec: C.ModelSpec) -> bytes:
    """The model with ``stats/<layer>/{sum,max,zeros}`` outputs, each (N, k) float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    axes_name = "convlens_stats_axes"
    zero_name = "convlens_stats_zero"
    graph.initializer.append(numpy_helper.from_array(np.array([1, 2], np.int64), axes_name))
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), zero_name))
    for out in spec.activation_outputs:
        assert out.layer is not None
        s_sum, s_max, s_zero = stat_names(out.layer)
        k = out.shape[-1]
        eq, cast = s_zero + "/eq", s_zero + "/cast"
        nodes = [
            helper.make_node("ReduceSum", [out.name, axes_name], [s_sum], keepdims=0),
            helper.make_node("Equal", [out.name, zero_name], [eq]),
            helper.make_node("Cast", [eq], [cast], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", [cast, axes_name], [s_zero], keepdims=0),
        ]
        if opset >= 18:
            nodes.append(helper.make_node("ReduceMax", [out.name, axes_name], [s_max], keepdims=0))
        else:
            nodes.append(
                helper.make_node("ReduceMax", [out.name], [s_max], axes=[1, 2], keepdims=0)
            )
        graph.node.extend(nodes)
        for name in (s_sum, s_max, s_zero):
            graph.output.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", k])
            )
    return bytes(model.SerializeToString())
