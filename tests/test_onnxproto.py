"""engine/onnxproto.py: the ONNX protos without ``import onnx`` (its ml_dtypes import costs
0.65-0.9 s at every start), and helpers that build what onnx.helper builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

import convlens
from convlens.engine import onnxproto as P

#: the tree the tests import convlens from, for the subprocesses (a worktree, say)
_TREE = str(Path(convlens.__file__).resolve().parents[1])


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": _TREE},
    )


NODES = [
    ("ReduceSum", ["x", "axes"], ["s"], {"keepdims": 0}),
    ("Equal", ["x", "zero"], ["eq"], {}),
    ("Cast", ["eq"], ["c"], {"to": onnx.TensorProto.FLOAT}),
    ("Gather", ["x", "rows"], ["g"], {"axis": 0}),
    ("ReduceMax", ["x"], ["m"], {"axes": [1, 2], "keepdims": 0}),
    ("Transpose", ["x"], ["t"], {"perm": (0, 3, 1, 2)}),
    ("LeakyRelu", ["x"], ["l"], {"alpha": 0.25}),
    ("Resize", ["x", "", "sc"], ["r"], {"mode": "linear", "coordinate_transformation_mode": b"x"}),
    ("Pad", ["x"], ["p"], {"value": 1.5, "mode": None}),
    ("Foo", ["x"], ["y"], {"fs": [1.0, 2.5], "mixed": [1, 2.5], "ss": ["a", b"b"]}),
    ("Foo", ["x"], ["y"], {"i": np.int64(3), "f": np.float32(0.5), "ints": np.array([4, 5])}),
]


@pytest.mark.parametrize("op,inputs,outputs,attrs", NODES)
def test_make_node_as_onnx_helper(op, inputs, outputs, attrs) -> None:
    ours = P.make_node(op, inputs, outputs, **attrs)
    theirs = helper.make_node(op, inputs, outputs, **attrs)
    assert ours.SerializeToString() == theirs.SerializeToString()


@pytest.mark.parametrize(
    "elem,shape",
    [
        (onnx.TensorProto.FLOAT, ["batch", 7, 7, 32]),
        (onnx.TensorProto.INT64, ["m"]),
        (onnx.TensorProto.FLOAT, []),  # a scalar: an empty shape, not none
        (onnx.TensorProto.FLOAT, None),
        (onnx.TensorProto.FLOAT, [None, "n", 3]),
    ],
)
def test_make_tensor_value_info_as_onnx_helper(elem, shape) -> None:
    ours = P.make_tensor_value_info("v", elem, shape)
    theirs = helper.make_tensor_value_info("v", elem, shape)
    assert ours.SerializeToString() == theirs.SerializeToString()


@pytest.mark.parametrize(
    "array",
    [
        np.array(0.0, np.float32),
        np.array((1, 2), np.int64),
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],  # not contiguous
        np.arange(6, dtype=">f4"),  # big-endian: stored little-endian
        np.array([True, False]),
        np.arange(5, dtype=np.float16),
        np.arange(5, dtype=np.int32),
        np.arange(5, dtype=np.uint8),
        np.arange(5, dtype=np.float64),
    ],
)
def test_from_array_as_numpy_helper(array: np.ndarray) -> None:
    ours = P.from_array(array, "w")
    native = array.astype(array.dtype.newbyteorder("="))  # numpy_helper refuses big-endian
    assert ours.SerializeToString() == numpy_helper.from_array(native, "w").SerializeToString()
    np.testing.assert_array_equal(numpy_helper.to_array(ours), array)


def test_from_array_refuses_what_it_cannot_store() -> None:
    with pytest.raises(TypeError):
        P.from_array(np.array(["a"]), "s")


def _graph(make) -> tuple[object, object, object]:
    """The statistics and tail pieces the engine builds, made by ``make`` (onnxproto or
    onnx.helper + numpy_helper)."""
    mk_node, mk_info, from_array, mk_graph = make
    nodes = [
        mk_node("Gather", ["x", "rows"], ["g"], axis=0),
        mk_node("ReduceSum", ["g", "axes"], ["sum"], keepdims=0),
        mk_node("ReduceMax", ["g", "axes"], ["max"], keepdims=0),
        mk_node("Equal", ["g", "zero"], ["eq"]),
        mk_node("Cast", ["eq"], ["cast"], to=P.TensorProto.FLOAT),
        mk_node("ReduceSum", ["cast", "axes"], ["zeros"], keepdims=0),
        mk_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        mk_node("LeakyRelu", ["nchw"], ["leaky"], alpha=0.25),
    ]
    inputs = [
        mk_info("x", P.TensorProto.FLOAT, ["batch", 3, 4, 5]),
        mk_info("rows", P.TensorProto.INT64, ["m"]),
    ]
    outputs = [mk_info(n, P.TensorProto.FLOAT, ["m", 5]) for n in ("sum", "max", "zeros")]
    outputs.append(mk_info("leaky", P.TensorProto.FLOAT, ["batch", 5, 3, 4]))
    weights = [
        from_array(np.array((1, 2), np.int64), "axes"),
        from_array(np.array(0.0, np.float32), "zero"),
    ]
    return mk_graph(nodes, "g", inputs, outputs, initializer=weights)


def test_graph_built_here_runs_in_onnxruntime() -> None:
    ours = _graph((P.make_node, P.make_tensor_value_info, P.from_array, P.make_graph))
    theirs = _graph(
        (
            helper.make_node,
            helper.make_tensor_value_info,
            numpy_helper.from_array,
            helper.make_graph,
        )
    )
    assert ours.SerializeToString() == theirs.SerializeToString()
    opsets = [helper.make_opsetid("", 18)]
    model = P.make_model(ours, opset_imports=opsets)
    reference = helper.make_model(theirs, opset_imports=opsets)
    assert model.ir_version == reference.ir_version == onnx.IR_VERSION
    assert model.SerializeToString() == reference.SerializeToString()
    onnx.checker.check_model(model, full_check=True)
    # the source model's IR version, as engine/tail.py sets it: onnxruntime may not read
    # the newest one onnx stamps
    model = P.make_model(ours, opset_imports=opsets, ir_version=8)
    assert model.ir_version == 8

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 4, 5)).astype(np.float32)
    x[x < 0.3] = 0.0
    rows = np.array([2, 0], np.int64)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    s, m, z, leaky = sess.run(["sum", "max", "zeros", "leaky"], {"x": x, "rows": rows})
    np.testing.assert_allclose(s, x[rows].sum(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m, x[rows].max(axis=(1, 2)))
    np.testing.assert_array_equal(z, (x[rows] == 0).sum(axis=(1, 2)))
    nchw = x.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(leaky, np.where(nchw < 0, 0.25 * nchw, nchw), rtol=1e-6)


def test_load_as_onnx_load(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, _ = demo_model
    reference = onnx.load(str(model_path)).SerializeToString()
    assert P.load(model_path).SerializeToString() == reference
    assert P.load(str(model_path), load_external_data=False).SerializeToString() == reference
    assert P.load(model_path.read_bytes()).SerializeToString() == reference
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(DecodeError):
        P.load(junk)
    with pytest.raises(OSError):
        P.load(tmp_path / "missing.onnx")


def test_load_resolves_external_data(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A model whose weights sit in a side file: onnx resolves them, as onnx.load does."""
    model_path, _ = demo_model
    split = tmp_path / "split.onnx"
    onnx.save_model(
        onnx.load(str(model_path)),
        str(split),
        save_as_external_data=True,
        location="split.data",
        size_threshold=0,
    )
    assert P.has_external_data(P.load(split, load_external_data=False))
    loaded = P.load(split)
    assert not P.has_external_data(loaded)
    assert loaded.SerializeToString() == onnx.load(str(split)).SerializeToString()
    weights = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    for t in onnx.load(str(model_path)).graph.initializer:
        np.testing.assert_array_equal(weights[t.name], numpy_helper.to_array(t))


@pytest.mark.parametrize("onnx_first", [False, True])
def test_classes_are_onnx_classes(onnx_first: bool) -> None:
    """Whichever is imported first, onnx and onnxproto hand out the same message classes,
    and onnx's checker takes a model built here."""
    first, second = "import onnx", "from convlens.engine import onnxproto as P"
    if not onnx_first:
        first, second = second, first
    r = _python(
        f"""
{first}
{second}
import numpy as np
assert onnx.ModelProto is P.ModelProto and onnx.TensorProto is P.TensorProto
assert onnx.NodeProto is P.NodeProto and onnx.GraphProto is P.GraphProto
assert onnx.ValueInfoProto is P.ValueInfoProto and onnx.IR_VERSION == P.IR_VERSION
g = P.make_graph(
    [P.make_node("Add", ["x", "w"], ["y"])], "g",
    [P.make_tensor_value_info("x", P.TensorProto.FLOAT, ["n", 2])],
    [P.make_tensor_value_info("y", P.TensorProto.FLOAT, ["n", 2])],
    initializer=[P.from_array(np.ones(2, np.float32), "w")],
)
m = P.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
onnx.checker.check_model(m, full_check=True)
assert isinstance(m, onnx.ModelProto)
"""
    )
    assert r.returncode == 0, r.stderr


def test_run_imports_neither_onnx_nor_ml_dtypes(demo_model: tuple[Path, Path], tmp_path) -> None:
    """``convlens run`` (read the spec, the main session with statistics over sampled
    rows, the tail cut out for Ablation-CAM) and ``convlens inspect`` never import the
    onnx package: its ml_dtypes import alone costs 0.6+ s at every start."""
    model, photos = demo_model
    images = [str(p) for p in sorted(photos.rglob("*.jpg"))[:3]]
    args = ["run", str(model), *images, "-o", str(tmp_path / "out"), "--no-report"]
    args += ["--cam", "gradcam", "--cam", "ablationcam", "--stats-every", "2"]
    r = _python(
        f"""
import json, sys
from convlens.cli import main
main({args!r}, standalone_mode=False)
main(["inspect", {str(model)!r}], standalone_mode=False)
print(json.dumps(sorted(m for m in ("onnx", "ml_dtypes") if m in sys.modules)))
"""
    )
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all('"ablationcam"' in line for line in lines)
    imported = r.stdout.splitlines()[-1]
    assert imported == "[]", f"the run path imported {imported}"
