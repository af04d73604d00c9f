"""Deferred weights: layout ops folded symbolically, the file streamed one weight at a
time, read back by onnx's own parser and run by onnxruntime against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from convlens.engine.results import atomic_write_bytes
from convlens.exporter.weights import Deferred, dedupe, external_view, fold_layouts, stream_model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 1, 4, 5)).astype(np.float32)  # HWIO-like, with a 1 to squeeze
V = RNG.standard_normal((6,)).astype(np.float32)


def _graph(w_as_initializer: bool) -> onnx.ModelProto:
    """y = x @ reshape(squeeze(transpose(W)), (20, 3)) + V[:3] ... as tf2onnx writes it."""
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[3, 2, 1, 0]),  # (5, 4, 1, 3)
        helper.make_node("Squeeze", ["wt", "axes"], ["ws"]),  # (5, 4, 3)
        helper.make_node("Reshape", ["ws", "shape"], ["wr"]),  # (20, 3)
        helper.make_node("MatMul", ["x", "wr"], ["m"]),
        helper.make_node("Slice", ["v", "starts", "ends"], ["vs"]),
        helper.make_node("Add", ["m", "vs"], ["y"]),
        helper.make_node("Identity", ["twin"], ["twin_out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 3], np.int64), "shape"),
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([3], np.int64), "ends"),
        numpy_helper.from_array(V.copy(), "twin"),  # equal to the deferred v: merged
    ]
    if w_as_initializer:
        inits += [numpy_helper.from_array(W, "w"), numpy_helper.from_array(V, "v")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 20])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("twin_out", TensorProto.FLOAT, [6]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_streamed_file_equals_the_unfolded_graph(tmp_path: Path) -> None:
    reads: list[str] = []

    def reader(name: str, value: np.ndarray) -> Deferred:
        def read() -> np.ndarray:
            reads.append(name)
            return value

        return Deferred(read, value.dtype, value.shape, key=name)

    model = _graph(w_as_initializer=False)
    deferred = {"w": reader("w", W), "v": reader("v", V)}
    assert fold_layouts(model, deferred) == 3
    assert not reads, "folding is symbolic: nothing is read"
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Slice", "Add", "Identity"]
    assert set(deferred) == {"wr", "v"} and deferred["wr"].shape == (20, 3)
    assert dedupe(model, deferred) == 1  # the initializer twin is the deferred v
    assert "twin" not in {i.name for i in model.graph.initializer}
    path = tmp_path / "m.onnx"
    places: dict[str, tuple[int, int]] = {}
    atomic_write_bytes(path, stream_model(model, deferred, places))
    assert sorted(reads) == ["v", "v", "w"]  # v once for dedupe, once written; w once
    data = path.read_bytes()
    for name, (offset, length) in places.items():  # raw little-endian bytes, in place
        want = deferred[name].value()
        assert data[offset : offset + length] == want.astype(want.dtype.newbyteorder("<")).tobytes()
    view = tmp_path / "view.onnx"  # the parity session's view: external data into m.onnx
    view.write_bytes(external_view(model, deferred, path.name, places).SerializeToString())
    assert view.stat().st_size < 1024

    loaded = onnx.load(path)  # onnx's own parser merges the appended messages
    onnx.checker.check_model(loaded)
    got = {i.name: numpy_helper.to_array(i) for i in loaded.graph.initializer}
    want_w = np.transpose(W, (3, 2, 1, 0)).squeeze(2).reshape(20, 3)
    np.testing.assert_array_equal(got["wr"], want_w)
    np.testing.assert_array_equal(got["v"], V)
    raw = W.nbytes + V.nbytes
    assert path.stat().st_size < raw + 2048, "each weight is in the file once"

    x = RNG.standard_normal((2, 20)).astype(np.float32)
    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(
        _graph(w_as_initializer=True).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    y, twin = ours.run(None, {"x": x})
    y_view, twin_view = ort.InferenceSession(str(view), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    np.testing.assert_array_equal(y_view, y)
    np.testing.assert_array_equal(twin_view, twin)
    y_ref, twin_ref = plain.run(None, {"x": x})  # onnxruntime doing the layout ops itself
    np.testing.assert_allclose(y, x @ want_w + V[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(twin, twin_ref)


def test_stream_writes_every_dtype_and_an_empty_graph(tmp_path: Path) -> None:
    values = {
        "f16": RNG.standard_normal((3, 7)).astype(np.float16),
        "f64": RNG.standard_normal((300,)),
        "i64": np.arange(-5, 5, dtype=np.int64).reshape(2, 5),
        "big": RNG.standard_normal((70, 1000)).astype(np.float32),  # a multi-byte varint
    }
    outs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in values.items()
    ]
    nodes = [helper.make_node("Identity", [n + "_w"], [n]) for n in values]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [], outs),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    deferred = {n + "_w": Deferred.of(v) for n, v in values.items()}
    path = tmp_path / "d.onnx"
    atomic_write_bytes(path, stream_model(model, deferred))
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    for n, v in values.items():
        assert got[n + "_w"].dtype == v.dtype
        np.testing.assert_array_equal(got[n + "_w"], v)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, v in zip(values, sess.run(list(values), {}), strict=True):
        np.testing.assert_array_equal(v, values[n])
