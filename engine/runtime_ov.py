"""OpenVINO behind the engine's session interface (the ``[openvino]`` extra, CPU only).

OpenVINO reads the same ONNX protos the engine gives onnxruntime (pruned per session,
statistics reductions added: :mod:`convlens.engine.graph`) and compiles them for its
CPU plugin.  ``openvino`` is imported here only, and only when asked for.

Settings (:data:`CONFIG`), chosen from ``benchmarks/bench_runtime.py`` (README,
Benchmarks):

- ``INFERENCE_PRECISION_HINT`` f32: on CPUs with AVX512-BF16 or AMX, OpenVINO's default
  is bf16, which moved CAM gradients by several per cent and flipped zero counts; f32
  matches onnxruntime to float rounding (tests/test_runtime_ov.py).  ``--precision bf16``
  asks for bf16 on purpose, where the CPU has native bf16 instructions (OpenVINO's
  ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``; emulated bf16 would be slower than f32).
  The whole graph then runs in bf16: OpenVINO 2026.4's CPU plugin ignored the
  ``precise_0`` (keep-f32) mark on convolutions, and on the benchmark models the
  gradients and statistics came out the same with the analysis nodes marked as without.
- ``PERFORMANCE_HINT`` LATENCY: the engine runs one request at a time (THROUGHPUT with
  one request was slower; two streams with two requests in flight faster in isolation,
  but the decoding threads already use the other core in a run).
- ``ENABLE_CPU_PINNING`` NO: decoding threads share the cores; pinned inference threads
  get preempted (pinning off was faster even alone).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import DeviceError, Session

#: compile_model's configuration (``threads`` adds INFERENCE_NUM_THREADS)
CONFIG: dict[str, str] = {
    "INFERENCE_PRECISION_HINT": "f32",
    "PERFORMANCE_HINT": "LATENCY",
    "ENABLE_CPU_PINNING": "NO",
}
MISSING = "OpenVINO is not installed: pip install 'convlens[openvino]'"
NO_BF16 = "--precision bf16: this CPU has no native bf16 instructions (OpenVINO lists no BF16)"


def available() -> bool:
    """Whether ``openvino`` imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def has_bf16() -> bool:
    """Whether the CPU plugin computes bf16 natively (AVX512-BF16 or AMX)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OvSession(Session):
    """A model compiled by OpenVINO for its CPU plugin, with one infer request."""

    def __init__(self, compiled: Any, note: str | None, precision: str = "f32"):
        super().__init__("openvino", "cpu", note, precision)
        self.compiled = compiled  # openvino.CompiledModel
        self.request = compiled.create_infer_request()
        self._ports = {n: o for o in compiled.outputs for n in o.get_names()}

    @property
    def input_names(self) -> list[str]:
        return [i.get_any_name() for i in self.compiled.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.get_any_name() for o in self.compiled.outputs]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``y = f(x)`` with the feeds shared, not copied; the outputs copied out of the
        request's buffers (the next call reuses them)."""
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        res = self.request.infer(feeds, share_inputs=True, share_outputs=True)
        return [np.array(res[self._ports[n]], copy=True) for n in names]


def _read(model: str | Path | bytes) -> Any:
    if isinstance(model, bytes):
        return _core().read_model(model, b"")
    return _core().read_model(str(model))


def unsupported_ops(model: Any) -> list[str]:
    """Op types of ``model`` (an ``openvino.Model``) the CPU plugin does not support."""
    supported = _core().query_model(model, "CPU")
    return sorted({op.get_type_name() for op in model.get_ops()} - _types(model, supported))


def _types(model: Any, supported: dict[str, str]) -> set[str]:
    return {op.get_type_name() for op in model.get_ops() if op.get_friendly_name() in supported}


def compile_model(
    model: str | Path | bytes,
    threads: int | None = None,
    config: dict[str, str] | None = None,
    precision: str | None = None,
) -> Any:
    """``model`` compiled for OpenVINO's CPU plugin with :data:`CONFIG` (or ``config``),
    in ``precision`` where given."""
    cfg: dict[str, Any] = dict(CONFIG if config is None else config)
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    m = _read(model)
    bad = unsupported_ops(m)
    if bad:
        raise RuntimeError(f"ops not supported by its CPU plugin: {', '.join(bad)}")
    return _core().compile_model(m, "CPU", cfg)


def open_openvino(
    model: str | Path | bytes, threads: int | None, note: str | None, precision: str = "f32"
) -> OvSession:
    """``--runtime openvino``: the session, or one line saying why not."""
    if not available():
        raise DeviceError(MISSING if precision == "f32" else f"--precision {precision}: {MISSING}")
    if precision == "bf16" and not has_bf16():
        raise DeviceError(NO_BF16)
    try:
        return OvSession(compile_model(model, threads, precision=precision), note, precision)
    except RuntimeError as exc:  # openvino's read/compile failures are RuntimeErrors
        raise DeviceError(f"OpenVINO cannot run this graph ({_first(exc)})") from exc


_NOISE = re.compile(
    r"^(Exception from |Check '.*' failed at |FrontEnd API failed|Summary:|To facil)"
)


def _first(exc: BaseException) -> str:
    """OpenVINO's message in one line: the unconverted ops where it names them, else its
    first line that is not a source location."""
    text = str(exc)
    m = re.search(r"No conversion rule found for operations: ([^\n]+)", text)
    if m:
        return f"no conversion for {m.group(1).strip()}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]
    return lines[0][:200] if lines else type(exc).__name__
