"""Sessions: the one interface the engine runs graphs through, whatever the runtime.

:func:`open_session` picks the device (CUDA only where it really loads, without
onnxruntime-gpu's multi-line noise) and the runtime:

- ``onnxruntime``: CUDA or CPU.  On CUDA batches go through I/O binding
  (:mod:`convlens.engine.runtime_bind`): outputs bound on the device, read back once,
  inputs from pinned host memory; on the CPU through ``InferenceSession.run`` (binding
  bought nothing there: ``benchmarks/bench_runtime.py``).
- ``openvino`` (the ``[openvino]`` extra, :mod:`convlens.engine.runtime_ov`): CPU only.
  The one runtime for ``precision="bf16"`` (float32 everywhere else).
- ``auto``: onnxruntime, on CUDA and on the CPU (OpenVINO for ``bf16``).  Measured
  (``benchmarks/bench.py`` rows 3/3v and 4/4v, ``benchmarks/bench_runtime.py``; README,
  Benchmarks): in float32 OpenVINO ran the plain exports about as fast as onnxruntime
  and the analysis graph (gradients, statistics) slower, in isolation and in whole runs;
  its lead in the issue's figures came from its bf16 default, which moves CAM gradients
  by per cents (``--precision bf16`` asks for it: README, Speed).  A timed
  probe at start was tried and dropped: on a shared machine the same call varied 2x, so
  it chose at random and cost a second or more.

Every session answers :meth:`Session.run` ``(names, feeds) -> arrays`` the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

DEVICES = ("auto", "cuda", "cpu")
RUNTIMES = ("auto", "onnxruntime", "openvino")
#: the arithmetic a session computes in: float32, or bfloat16 (OpenVINO on CPUs with
#: native bf16 instructions; README, Speed, for what it moves)
PRECISIONS = ("f32", "bf16")


def cpu_only(runtime: str, precision: str) -> bool:
    """Whether a run with this runtime and precision runs on the CPU whatever the
    device: OpenVINO's (``--runtime openvino``, and every precision but float32)."""
    return runtime == "openvino" or precision != "f32"


class DeviceError(RuntimeError):
    """The requested device or runtime cannot be used; ``str(e)`` is one line."""


class Session(ABC):
    """One compiled graph on one device, whatever runs it."""

    def __init__(self, runtime: str, device: str, note: str | None, precision: str = "f32"):
        self.runtime = runtime  # "onnxruntime" or "openvino"
        self.device = device  # "cuda" or "cpu"
        self.note = note  # one line to tell the user (e.g. the CUDA fallback), or None
        self.precision = precision  # one of PRECISIONS
        #: how many :meth:`run` calls the engine makes at once, on threads of their own,
        #: each over a part of a batch: onnxruntime's CPU sessions opened for streams,
        #: else one
        self.streams = 1

    @property
    def label(self) -> str:
        """What runs the graph, as the summary line says it: the runtime, and the
        precision unless float32 (``openvino bf16``)."""
        return self.runtime if self.precision == "f32" else f"{self.runtime} {self.precision}"

    @property
    @abstractmethod
    def input_names(self) -> list[str]:
        """The graph's input names."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """The graph's output names."""

    @abstractmethod
    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` (host arrays, the caller's to keep) for ``feeds``."""


class OrtSession(Session):
    """An onnxruntime InferenceSession; batches through I/O binding where ``bind``, else
    through ``InferenceSession.run``."""

    def __init__(self, session: Any, device: str, note: str | None, bind: bool, streams: int = 1):
        from .runtime_bind import Binder

        super().__init__("onnxruntime", device, note)
        self.session = session  # onnxruntime.InferenceSession
        self.binder = Binder(session, device) if bind else None
        # InferenceSession.run is thread-safe; the binder's buffers are one call's
        self.streams = 1 if bind else streams

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.binder is None or not feeds:
            return list(self.session.run(names, feeds))
        return self.binder.run(names, feeds)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to fd 2 (onnxruntime logs there, not to sys.stderr)."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def _reason(log: str) -> str:
    """A short reason out of onnxruntime's CUDA provider error text."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log)
    m = re.search(r"(lib[\w.\-]+\.so[\w.]*): cannot open shared object file", text)
    if m:
        return f"{m.group(1)} not found"
    m = re.search(r"CUDA failure \d+: ([^;\n]+)", text)
    if m:
        return m.group(1).strip()
    for line in text.splitlines():
        line = line.strip()
        if "error" in line.lower():
            line = re.sub(r"^.*?\] ", "", line)
            return line[:160]
    return "the CUDA provider did not load"


def session_options(threads: int | None = None) -> Any:
    """onnxruntime's session options: every graph optimisation, errors-only logging,
    ``threads`` intra-op threads (default: onnxruntime's, one per core), no spinning.

    Measured by ``benchmarks/bench_runtime.py``: ORT_ENABLE_ALL against BASIC/EXTENDED and
    spinning on or off (README, Benchmarks)."""
    import onnxruntime as ort

    # the environment's own logger (device discovery, provider loading) says warnings
    # to stderr at its default level; errors only, like the sessions (the CUDA probe
    # below captures them for its one-line reason)
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # decoding threads share the cores: onnxruntime's workers must not spin between runs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def open_session(
    model: str | Path | bytes,
    device: str = "auto",
    threads: int | None = None,
    runtime: str = "onnxruntime",
    bind: bool | None = None,
    precision: str = "f32",
    streams: int = 1,
) -> Session:
    """A session on ``device`` ("auto", "cuda" or "cpu") run by ``runtime`` ("auto",
    "onnxruntime" or "openvino") in ``precision`` (:data:`PRECISIONS`).  ``streams``: the
    calls an onnxruntime CPU session is to run at once (its :attr:`Session.streams`; its
    intra-op pool, which they share, defaults to the CPUs less the other callers:
    :func:`_cpu`); other sessions take one.

    ``auto`` device uses CUDA only where it really loads, else says one line and uses the
    CPU; ``cuda`` fails with one line when CUDA does not load.  ``auto`` runtime: see the
    module docstring.  ``bind``: onnxruntime batches through I/O binding (default: on
    CUDA only).  ``bf16`` runs on OpenVINO's CPU plugin only: ``auto`` runtime and device
    then mean OpenVINO on the CPU, and onnxruntime or CUDA fail in one line.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: choose auto, cuda or cpu")
    if runtime not in RUNTIMES:
        raise DeviceError(f"unknown runtime {runtime!r}: choose {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision != "f32":
        if device == "cuda":
            raise DeviceError(f"--precision {precision} runs on the CPU (OpenVINO): not on CUDA")
        if runtime == "onnxruntime":
            raise DeviceError(
                f"--precision {precision} runs on OpenVINO: onnxruntime computes in float32 "
                "(use --runtime openvino or auto)"
            )
        runtime = "openvino"
    if runtime == "openvino":
        if device == "cuda":
            raise DeviceError("--runtime openvino runs on the CPU: use onnxruntime for CUDA")
        from .runtime_ov import open_openvino

        return open_openvino(model, threads, None, precision)
    src = model if isinstance(model, bytes) else str(model)
    if device == "cpu":
        return _cpu(src, threads, None, bind, streams)
    import onnxruntime as ort

    opts = session_options(threads)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
        if device == "cuda":
            raise DeviceError(f"CUDA not available ({reason})")
        note = f"CUDA not available ({reason}); using CPU"
        return _cpu(src, threads, note, bind, streams)
    with _captured_stderr() as log:
        try:
            sess = ort.InferenceSession(
                src, opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )
            failure = None
        except Exception as exc:  # a broken CUDA install can raise instead of falling back
            sess, failure = None, str(exc)
    text = "".join(log) + (failure or "")
    if sess is not None and "CUDAExecutionProvider" in sess.get_providers():
        return OrtSession(sess, "cuda", None, True if bind is None else bind)
    reason = _reason(text)
    if device == "cuda":
        raise DeviceError(f"CUDA not available ({reason})")
    note = f"CUDA not available ({reason}); using CPU"
    return _cpu(src, threads, note, bind, streams)


def _cpu(
    src: str | bytes, threads: int | None, note: str | None, bind: bool | None, streams: int = 1
) -> Session:
    """An onnxruntime CPU session for ``streams`` concurrent runs (``InferenceSession.run``
    is thread-safe; with I/O binding, one).  The runs share the session's one intra-op
    pool (``threads`` - 1 workers besides each calling thread), so by default it gets
    the CPUs less the other callers: ``streams`` threads on 2 CPUs, one each, as
    measured; every CPU busy, as with one call, on larger machines."""
    import onnxruntime as ort

    if streams > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) - streams + 1)
    sess = ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])
    return OrtSession(sess, "cpu", note, bool(bind), streams)
