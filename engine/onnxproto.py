"""The ONNX protobuf classes and the few helpers the engine needs, without ``import onnx``.

Why: ``import onnx`` (1.23) costs 0.65-0.9 s, nearly all of it in ``ml_dtypes``, which
onnx's ``__init__`` imports and whose C extension registers numpy ufunc loops for its
float8/int4 types at import; every ``convlens run`` would pay that at start (a quarter
of the wall time of a 300-image run).  The engine reads and edits model protos only, so
this module loads onnx's generated ``onnx/onnx_ml_pb2.py``, which imports nothing but
``google.protobuf``, by file path under a private module name (~20 ms) without running
``onnx/__init__``.  When ``onnx`` is already imported its own module is used; when it is
imported later, protobuf finds the identical file already in its descriptor pool and
hands out the same message classes (``onnx.ModelProto is onnxproto.ModelProto``), so
protos made here and by onnx mix freely.

The helpers below are written by hand on those classes and build what ``onnx.helper`` /
``onnx.numpy_helper`` build for the cases the engine uses (tests/test_onnxproto.py
compares them).  The one fallback: :func:`load` of a model whose tensors keep their data
in external files imports onnx to resolve it, as ``onnx.load`` does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

_PRIVATE_NAME = "convlens_onnx_pb2"


def _pb2() -> ModuleType:
    """onnx's generated ``onnx_ml_pb2`` module, loaded without ``onnx/__init__``."""
    onnx = sys.modules.get("onnx")
    if onnx is not None and hasattr(onnx, "onnx_ml_pb2"):
        return onnx.onnx_ml_pb2  # type: ignore[no-any-return]
    if _PRIVATE_NAME in sys.modules:
        return sys.modules[_PRIVATE_NAME]
    found = importlib.util.find_spec("onnx")  # finds the package, runs none of it
    if found is None or not found.submodule_search_locations:
        raise ImportError("convlens needs the onnx package (pip install onnx)")
    path = os.path.join(list(found.submodule_search_locations)[0], "onnx_ml_pb2.py")
    spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PRIVATE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_PRIVATE_NAME]
        raise
    return module


_pb = _pb2()

ModelProto = _pb.ModelProto
GraphProto = _pb.GraphProto
NodeProto = _pb.NodeProto
AttributeProto = _pb.AttributeProto
TensorProto = _pb.TensorProto
ValueInfoProto = _pb.ValueInfoProto
OperatorSetIdProto = _pb.OperatorSetIdProto
#: the IR version ``onnx.helper.make_model`` stamps (``onnx.IR_VERSION``)
IR_VERSION: int = _pb.IR_VERSION

# numpy dtype -> TensorProto data type, for from_array (onnx.helper.np_dtype_to_tensor_dtype)
_DATA_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint64): TensorProto.UINT64,
    np.dtype(np.uint32): TensorProto.UINT32,
    np.dtype(np.uint16): TensorProto.UINT16,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}

# file extensions onnx.load reads as text or JSON, not binary protobuf
_TEXT_FORMATS = frozenset(
    {".txtpb", ".textproto", ".prototxt", ".pbtxt", ".json", ".onnxjson", ".onnxtxt", ".onnxtext"}
)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, attribute tensors, subgraphs' too."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def has_external_data(model: Any) -> bool:
    """Whether any tensor of ``model`` keeps its data in an external file."""
    return any(t.data_location == TensorProto.EXTERNAL for t in _tensors(model.graph))


def load(source: str | os.PathLike[str] | bytes, load_external_data: bool = True) -> Any:
    """A ModelProto parsed from a file path or from serialized bytes, as ``onnx.load``.

    A model file whose tensors keep their data in external files (``data_location ==
    EXTERNAL``) gets it resolved by onnx itself, which is imported for that only; so is
    a path with one of onnx's text-format extensions.  Errors are onnx.load's: OSError
    for the file, ``google.protobuf.message.DecodeError`` for bytes that are not a model.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse(bytes(source))
    path = os.fspath(source)
    if os.path.splitext(path)[1] in _TEXT_FORMATS:
        import onnx

        return onnx.load(path, load_external_data=load_external_data)
    with open(path, "rb") as f:
        model = _parse(f.read())
    if load_external_data and has_external_data(model):
        import onnx  # what onnx.load does after parsing

        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    return model


def _parse(data: bytes) -> Any:
    model = ModelProto()
    read = model.ParseFromString(data)
    if read is not None and read != len(data):  # as onnx's protobuf serializer checks
        raise DecodeError(f"Protobuf decoding consumed too few bytes: {read} out of {len(data)}")
    return model


def _attribute(name: str, value: Any) -> Any:
    """``onnx.helper.make_attribute`` for int, float, str/bytes and lists of them."""
    attr = AttributeProto()
    attr.name = name
    if isinstance(value, (bool, int, np.integer)):
        attr.i, attr.type = int(value), AttributeProto.INT
    elif isinstance(value, (float, np.floating)):
        attr.f, attr.type = float(value), AttributeProto.FLOAT
    elif isinstance(value, (str, bytes)):
        attr.s, attr.type = _bytes(value), AttributeProto.STRING
    elif isinstance(value, (Sequence, np.ndarray)):
        values = list(value)
        if not values:
            raise ValueError(f"Could not infer attribute `{name}` type from empty iterator")
        if all(isinstance(v, (bool, int, np.integer)) for v in values):
            attr.ints.extend(int(v) for v in values)
            attr.type = AttributeProto.INTS
        elif all(isinstance(v, (bool, int, float, np.integer, np.floating)) for v in values):
            attr.floats.extend(float(v) for v in values)
            attr.type = AttributeProto.FLOATS
        elif all(isinstance(v, (str, bytes)) for v in values):
            attr.strings.extend(_bytes(v) for v in values)
            attr.type = AttributeProto.STRINGS
        else:
            raise TypeError(f"attribute {name!r}: a list of mixed or unsupported types")
    else:
        raise TypeError(f"attribute {name!r}: {type(value).__name__} is not supported here")
    return attr


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def make_node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> Any:
    """A NodeProto, as ``onnx.helper.make_node`` (attributes sorted by name, None skipped)."""
    node = NodeProto()
    node.op_type = op_type
    node.input.extend(inputs)
    node.output.extend(outputs)
    node.attribute.extend(_attribute(k, v) for k, v in sorted(attrs.items()) if v is not None)
    return node


def make_tensor_value_info(
    name: str, elem_type: int, shape: Sequence[str | int | None] | None
) -> Any:
    """A tensor ValueInfoProto, as ``onnx.helper.make_tensor_value_info``: int dims are
    fixed sizes, str dims named dynamic ones, None unknown ones."""
    info = ValueInfoProto()
    info.name = name
    tensor_type = info.type.tensor_type
    tensor_type.elem_type = elem_type
    if shape is not None:
        tensor_type.shape.SetInParent()  # an empty shape (a scalar) is still a shape
        for d in shape:
            dim = tensor_type.shape.dim.add()
            if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
                dim.dim_value = int(d)
            elif isinstance(d, str):
                dim.dim_param = d
            elif d is not None:
                raise ValueError(f"Invalid item in shape: {d}. Needs to be of int or str.")
    return info


def from_array(array: np.ndarray, name: str | None = None) -> Any:
    """A TensorProto holding ``array`` as raw little-endian data, as
    ``onnx.numpy_helper.from_array`` (numeric and bool dtypes)."""
    array = np.asarray(array)
    try:
        data_type = _DATA_TYPES[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TypeError(f"from_array: dtype {array.dtype} is not supported here") from None
    tensor = TensorProto()
    tensor.dims.extend(array.shape)
    if name:
        tensor.name = name
    tensor.data_type = data_type
    tensor.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return tensor


def make_graph(
    nodes: Sequence[Any],
    name: str,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    initializer: Sequence[Any] | None = None,
) -> Any:
    """A GraphProto, as ``onnx.helper.make_graph``."""
    graph = GraphProto()
    graph.node.extend(nodes)
    graph.name = name
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    graph.initializer.extend(initializer or [])
    return graph


def make_model(graph: Any, *, opset_imports: Sequence[Any], ir_version: int = IR_VERSION) -> Any:
    """A ModelProto, as ``onnx.helper.make_model``: ``ir_version`` defaults to the one it
    stamps (``onnx.IR_VERSION``); the opsets are required (onnx's default, the newest
    opset it knows, needs its C extension)."""
    model = ModelProto()
    model.ir_version = ir_version
    model.graph.CopyFrom(graph)
    model.opset_import.extend(opset_imports)
    return model


__all__ = [
    "IR_VERSION",
    "AttributeProto",
    "GraphProto",
    "ModelProto",
    "NodeProto",
    "OperatorSetIdProto",
    "TensorProto",
    "ValueInfoProto",
    "from_array",
    "has_external_data",
    "load",
    "make_graph",
    "make_model",
    "make_node",
    "make_tensor_value_info",
]
