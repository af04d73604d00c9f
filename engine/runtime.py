"""onnxruntime sessions: device choice without onnxruntime-gpu's multi-line noise."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cuda", "cpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used; ``str(e)`` is one line."""


@dataclass
class Session:
    session: Any  # onnxruntime.InferenceSession
    device: str  # "cuda" or "cpu"
    note: str | None  # one line to tell the user (e.g. the CUDA fallback), or None


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
    model: str | Path | bytes, device: str = "auto", threads: int | None = None
) -> Session:
    """Open an InferenceSession on ``device`` ("auto", "cuda" or "cpu").

    ``auto`` uses CUDA only where it really loads, else says one line and uses the CPU.
    ``cuda`` fails with one line when CUDA does not load.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: choose auto, cuda or cpu")
    src = model if isinstance(model, bytes) else str(model)
    opts = session_options(threads)
    if device == "cpu":
        return Session(
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]), "cpu", None
        )
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
        if device == "cuda":
            raise DeviceError(f"CUDA not available ({reason})")
        sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return Session(sess, "cpu", f"CUDA not available ({reason}); using CPU")
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
        return Session(sess, "cuda", None)
    reason = _reason(text)
    if device == "cuda":
        raise DeviceError(f"CUDA not available ({reason})")
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return Session(sess, "cpu", f"CUDA not available ({reason}); using CPU")
