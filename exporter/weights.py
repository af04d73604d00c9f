"""Large weights kept out of every copy: read from their variables only as the file is written.

tf2onnx copies every constant it is given several times over while it optimises, so
weights of :data:`HELD_OUT_ELEMENTS` values or more go through it as placeholders.
After conversion each one is a :class:`Deferred`: the variable it is read from, and
the layout ops (Transpose, Reshape, ...) tf2onnx put on it, folded symbolically.  No
copy of the values exists until :func:`stream_model` writes the file, one tensor at a
time straight from the variable's own buffer: the process holds the Keras model's
weights and, while the file is written, one tensor in its ONNX layout.

The file is the serialized model without those initializers, followed by one
``ModelProto{graph{initializer}}`` message per weight: protobuf merges repeated
embedded messages, so every reader (onnxruntime, ``onnx.load``) sees one graph holding
every initializer.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

HELD_OUT_ELEMENTS = 1 << 10  # weights this large bypass tf2onnx (1,024 values, 4 KB)
LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity")

Step = tuple[str, tuple[int, ...]]  # ("transpose", perm) | ("reshape", shape)


@dataclass(frozen=True)
class Deferred:
    """A weight not yet read: ``read()`` gives the variable's values (no copy where the
    variable is a TensorFlow variable on the CPU), ``steps`` the layout ops to apply."""

    read: Callable[[], np.ndarray]
    dtype: np.dtype[Any]
    source_shape: tuple[int, ...]
    steps: tuple[Step, ...] = ()
    key: Any = field(default=None, compare=False)  # identifies the source, for dedupe

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.source_shape
        for op, arg in self.steps:
            shape = tuple(shape[p] for p in arg) if op == "transpose" else arg
        return shape

    def value(self) -> np.ndarray:
        """The values in their ONNX layout (one new array at most, for a transpose)."""
        x = np.asarray(self.read())
        for op, arg in self.steps:
            x = np.transpose(x, arg) if op == "transpose" else x.reshape(arg)
        return np.ascontiguousarray(x, dtype=self.dtype)

    @classmethod
    def of(cls, value: np.ndarray) -> Deferred:
        """A weight whose values are already in memory (held, not copied)."""
        return cls(functools.partial(np.asarray, value), value.dtype, value.shape)

    def then(self, op: str, arg: tuple[int, ...]) -> Deferred:
        return replace(self, steps=(*self.steps, (op, tuple(int(a) for a in arg))))


def variable_reader(tf: Any, handle: Any, dtype: Any) -> Callable[[], np.ndarray]:
    """Read a resource variable by its handle: a read-only view of its buffer."""
    from tensorflow.python.ops import gen_resource_variable_ops

    def read() -> np.ndarray:
        return np.asarray(gen_resource_variable_ops.read_variable_op(handle, dtype))

    return read


def fold_layouts(model_proto: Any, deferred: dict[str, Deferred]) -> int:
    """Fold the layout ops tf2onnx put on weights (Transpose HWIO -> OIHW, Reshape,
    Squeeze, Unsqueeze, Identity): into the :class:`Deferred` they read, symbolically,
    or, for an ordinary initializer, into a new initializer computed once with numpy.
    Initializers and deferred weights left unused are dropped.  Returns how many nodes
    were folded."""
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
            if node.op_type not in LAYOUT_OPS or not node.input or node.output[0] in outputs:
                continue
            src, *args = node.input
            if src not in deferred and src not in inits:
                continue
            if not all(a in inits for a in args if a):
                continue
            consts = [numpy_helper.to_array(inits[a]).tolist() for a in args if a]
            attrs = {a.name: list(a.ints) for a in node.attribute}
            if src in deferred:
                d = deferred[src]
                step = _step(node.op_type, d.shape, consts, attrs)
                deferred[node.output[0]] = d.then(*step) if step else d
            else:
                x = numpy_helper.to_array(inits[src])
                step = _step(node.op_type, x.shape, consts, attrs)
                y = Deferred.of(x).then(*step).value() if step else x
                new = numpy_helper.from_array(y, node.output[0])
                del x, y
                graph.initializer.append(new)
                inits[new.name] = new
            graph.node.remove(node)
            for name in node.input:  # what nothing else reads goes now, not at the end,
                readers[name] -= 1  # so that two copies are never held
                if name and readers[name] <= 0 and name not in outputs:
                    if name in inits:
                        graph.initializer.remove(inits.pop(name))
                    deferred.pop(name, None)
            folded += 1
            changed = True
    used = {n for node in graph.node for n in node.input} | outputs
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    for name in [n for n in deferred if n not in used]:
        del deferred[name]
    return folded


def _step(
    op: str, shape: tuple[int, ...], consts: list[Any], attrs: dict[str, list[int]]
) -> Step | None:
    """One layout op as a step on a tensor of ``shape`` (None for Identity)."""
    if op == "Identity":
        return None
    if op == "Transpose":
        perm = attrs.get("perm") or list(range(len(shape)))[::-1]
        return ("transpose", tuple(perm))
    if op == "Reshape":
        want = [shape[i] if d == 0 else int(d) for i, d in enumerate(consts[0])]
        if -1 in want:
            known = int(np.prod([d for d in want if d != -1]))
            want[want.index(-1)] = int(np.prod(shape)) // max(known, 1)
        return ("reshape", tuple(want))
    axes = consts[0] if consts else attrs.get("axes", [])
    if op == "Squeeze":  # no axes: every axis of size 1
        drop = (
            {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
        )
        return ("reshape", tuple(d for i, d in enumerate(shape) if i not in drop))
    out = list(shape)
    for ax in sorted(a % (len(shape) + len(axes)) for a in axes):
        out.insert(ax, 1)
    return ("reshape", tuple(out))


def dedupe(model_proto: Any, deferred: dict[str, Deferred]) -> int:
    """Merge byte-identical weights: deferred ones read from the same variable with the
    same layout, and an ordinary initializer equal to a deferred one or to another (the
    CAM weights are the dense kernel itself).  Returns how many were dropped."""
    import hashlib

    from onnx import numpy_helper

    alias: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for name, d in list(deferred.items()):
        k = (d.key, d.steps) if d.key is not None else None
        if k is not None and k in seen:
            alias[name] = seen[k]
            del deferred[name]
        elif k is not None:
            seen[k] = name
    by_shape: dict[tuple[Any, ...], list[str]] = {}
    for name, d in deferred.items():
        by_shape.setdefault((d.dtype.str, d.shape), []).append(name)
    graph = model_proto.graph
    first: dict[tuple[Any, ...], str] = {}
    keep = []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        twin = next(
            (n for n in by_shape.get((arr.dtype.str, arr.shape), []) if _equal(deferred[n], arr)),
            None,
        )
        key = (arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())
        if twin is not None:
            alias[init.name] = twin
        elif key in first:
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


def _equal(d: Deferred, arr: np.ndarray) -> bool:
    return bool(np.array_equal(d.value(), arr))


def stream_model(
    model_proto: Any,
    deferred: dict[str, Deferred],
    places: dict[str, tuple[int, int]] | None = None,
) -> Iterator[bytes | memoryview]:
    """The model file in chunks: ``model_proto`` serialized, then each deferred weight
    as its own ``ModelProto{graph{initializer}}`` message, read when its turn comes.
    ``places``, when given, receives each weight's (offset, length) in the file."""
    import onnx
    from onnx import helper

    head = model_proto.SerializeToString()
    yield head
    pos = len(head)
    for name, d in deferred.items():
        values = d.value()
        proto = onnx.TensorProto(name=name, dims=values.shape)
        proto.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
        raw = values.astype(values.dtype.newbyteorder("<"), copy=False).data.cast("B")
        tensor = proto.SerializeToString() + _key(9) + _varint(raw.nbytes)
        init = _key(5) + _varint(len(tensor) + raw.nbytes)
        prefix = _key(7) + _varint(len(init) + len(tensor) + raw.nbytes) + init + tensor
        yield prefix
        pos += len(prefix)
        if places is not None:
            places[name] = (pos, raw.nbytes)
        yield raw
        pos += raw.nbytes
        del values, raw


def external_view(
    model_proto: Any,
    deferred: dict[str, Deferred],
    location: str,
    places: dict[str, tuple[int, int]],
) -> Any:
    """``model_proto`` with each deferred weight an external-data initializer that reads
    its bytes where :func:`stream_model` put them in the file ``location`` (a name in
    the same folder).  onnxruntime reads external data straight into its tensors: one
    copy of the weights, where loading the file itself holds 1.6 (ConvNeXtXLarge's
    1.39 GB took 2.2 GB)."""
    import onnx
    from onnx import helper

    view = onnx.ModelProto()
    view.CopyFrom(model_proto)
    for name, d in deferred.items():
        offset, length = places[name]
        t = view.graph.initializer.add()
        t.name = name
        t.dims.extend(d.shape)
        t.data_type = helper.np_dtype_to_tensor_dtype(d.dtype)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return view


def _key(field_number: int) -> bytes:
    """A length-delimited field's tag."""
    return _varint(field_number << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
