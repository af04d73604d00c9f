"""onnxruntime I/O binding: how a batch goes in and its outputs come out.

Per batch the inputs are bound from host memory and every output is bound on the
session's device (``cuda`` or ``cpu``): onnxruntime writes the outputs where the graph
computed them, and they cross to the host once, all together, when the batch's results
are read (``copy_outputs_to_cpu``).  On CUDA the inputs are first copied into page-locked
(pinned) host buffers, registered once per shape with ``cudaHostRegister``, so the
host-to-device copy is a DMA transfer rather than a staged copy of pageable memory;
where libcudart cannot be loaded the inputs are bound as they are.

The same code runs on the CPU provider (outputs bound on ``cpu``), which is how the tests
check that bound runs give exactly what ``InferenceSession.run`` gives.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from typing import Any

import numpy as np


class Binder:
    """Runs batches of one onnxruntime session through I/O binding."""

    def __init__(self, session: Any, device: str):
        self.session = session  # onnxruntime.InferenceSession
        self.where = "cuda" if device == "cuda" else "cpu"
        self.pinned = PinnedInputs() if device == "cuda" else None

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` for ``feeds``, as host arrays."""
        binding = self.session.io_binding()
        for k, v in feeds.items():
            arr = np.ascontiguousarray(v)
            if self.pinned is not None:
                arr = self.pinned.stage(k, arr)
            binding.bind_cpu_input(k, arr)
        for n in names:
            binding.bind_output(n, self.where)
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())


def _cudart() -> Any | None:
    """libcudart (CUDA 13 or 12), from the system or from the pip ``nvidia-*`` packages
    onnxruntime-gpu uses; None where none loads."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    import site

    roots = [*site.getsitepackages(), site.getusersitepackages()]
    for root in roots:
        for path in sorted(
            glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so*"), recursive=True)
        ):
            with contextlib.suppress(OSError):
                return ctypes.CDLL(path)
    return None


class PinnedInputs:
    """Page-locked host buffers, one per input name and shape, reused batch after batch."""

    def __init__(self) -> None:
        self.cudart = _cudart()
        self.buffers: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}
        self.refused: set[tuple[str, tuple[int, ...], str]] = set()

    def stage(self, name: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` copied into the pinned buffer for its name and shape (``arr`` itself
        where pinning is unavailable or the registration fails)."""
        key = (name, tuple(arr.shape), arr.dtype.str)
        if self.cudart is None or key in self.refused:
            return arr
        buf = self.buffers.get(key)
        if buf is None:
            buf = np.empty_like(arr)
            rc = self.cudart.cudaHostRegister(
                ctypes.c_void_p(buf.ctypes.data), ctypes.c_size_t(buf.nbytes), ctypes.c_uint(0)
            )
            if rc != 0:  # cudaSuccess is 0; pinning is an optimisation, not a requirement
                self.refused.add(key)
                return arr
            self.buffers[key] = buf
        np.copyto(buf, arr)
        return buf


class FixedBinder:
    """Batches of one fixed shape through buffers bound once: inputs and outputs live in
    fixed buffers on ``device``, updated in place, as CUDA graph replay requires
    (onnxruntime's ``enable_cuda_graph``, set here on CUDA: the first run captures the
    graph, later runs replay it without launching kernels one by one).

    The output shapes are learnt from one run of ``example`` on a CPU session.  Measured
    by benchmarks/device_check.py against plain binding; not used by runs yet (it has not
    run on a GPU).  On the CPU the same code runs without the graph (tests).
    """

    def __init__(self, model: bytes, names: list[str], example: dict[str, np.ndarray], device: str):
        import onnxruntime as ort

        from .runtime import session_options

        cpu = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
        shapes = [(o.shape, o.dtype) for o in cpu.run(names, example)]
        where = "cuda" if device == "cuda" else "cpu"
        providers: list[Any] = ["CPUExecutionProvider"]
        if where == "cuda":
            providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
        self.session = ort.InferenceSession(model, session_options(), providers=providers)
        self.names = names
        self.inputs = {
            k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), where, 0)
            for k, v in example.items()
        }
        self.outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type(list(s), d, where, 0) for s, d in shapes
        ]
        self.binding = self.session.io_binding()
        for k, v in self.inputs.items():
            self.binding.bind_ortvalue_input(k, v)
        for n, v in zip(names, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(n, v)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``feeds`` (the example's shapes), as host arrays."""
        for k, v in feeds.items():
            self.inputs[k].update_inplace(np.ascontiguousarray(v))
        self.session.run_with_iobinding(self.binding)
        return [v.numpy().copy() for v in self.outputs]
