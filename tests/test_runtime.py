"""The session interface without OpenVINO: I/O binding against onnxruntime's own run,
and the --runtime option's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from convlens.engine import contract as C
from convlens.engine.graph import with_stats
from convlens.engine.images import Preprocessor, read_image
from convlens.engine.infer import main_outputs
from convlens.engine.plan import RunPlan
from convlens.engine.runtime import OrtSession, open_session


def analysis_batches(model: Path, photos: Path, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """The demo photos decoded and preprocessed as the engine does, in batches of ``sizes``."""
    spec = C.read_spec(model)
    pre = Preprocessor(spec.input, spec.preprocess)
    x = np.stack([pre(read_image(p)) for p in sorted(photos.rglob("*.jpg"))])
    out, i = [], 0
    for n in sizes:
        out.append(x[i : i + n])
        i += n
    assert i <= len(x) and all(len(b) for b in out)
    return out


def default_graph(model: Path) -> tuple[bytes, list[str], RunPlan]:
    """The graph a default run's main session serves: pruned, statistics added."""
    plan = RunPlan.build(model)
    names = main_outputs(plan)
    return with_stats(onnx.load(str(model)), plan.spec, keep=names), names, plan


def test_io_binding_gives_what_run_gives(demo_model: tuple[Path, Path]) -> None:
    """Bound inputs and outputs (the CUDA path's code, on the CPU provider) against
    InferenceSession.run on the same session: identical arrays, batch size changing
    between calls as the last batch does."""
    model, photos = demo_model
    graph, names, plan = default_graph(model)
    bound = open_session(graph, "cpu", runtime="onnxruntime", bind=True)
    assert isinstance(bound, OrtSession) and bound.binder is not None
    assert C.OUT_GRADIENTS in names and any(n.startswith("stats/") for n in names)
    for x in analysis_batches(model, photos, (8, 5, 2)):
        feeds = {C.IN_IMAGE: x, C.IN_TARGETS: plan.targets(len(x))}
        want = bound.session.run(names, feeds)
        got = bound.run(names, feeds)
        assert len(got) == len(want)
        for n, a, b in zip(names, got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, n
            np.testing.assert_array_equal(a, b, err_msg=n)
        # the results are the caller's: a later call does not overwrite them
        kept = [a.copy() for a in got]
        bound.run(names, {C.IN_IMAGE: x[::-1].copy(), C.IN_TARGETS: plan.targets(len(x))})
        for a, k in zip(got, kept, strict=True):
            np.testing.assert_array_equal(a, k)


def _convlens(*args: str, block_openvino: bool = False) -> subprocess.CompletedProcess[str]:
    """``convlens ARGS`` in a fresh interpreter; ``block_openvino``: as where the
    [openvino] extra is not installed (its import fails)."""
    pre = "import sys; sys.modules['openvino'] = None; " if block_openvino else ""
    code = pre + "from convlens.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_runtime_errors_are_one_line(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    src = str(photos / "grass")
    r = _convlens("run", str(model), src, "-o", str(tmp_path / "a"), "--device", "cuda",
                  "--runtime", "openvino")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "runtime openvino runs on the CPU" in r.stderr and r.stderr.count("\n") == 1
    r = _convlens("run", str(model), src, "-o", str(tmp_path / "b"), "--runtime", "openvino",
                  block_openvino=True)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "OpenVINO is not installed: pip install 'convlens[openvino]'" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_auto_without_openvino_uses_onnxruntime(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """No [openvino] extra: auto runs onnxruntime, says so in the summary line, no note."""
    model, photos = demo_model
    r = _convlens("run", str(model), str(photos / "grass"), "-o", str(tmp_path / "o"),
                  "--device", "cpu", "--no-report", block_openvino=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _one_line(r.stderr).endswith("img/s on cpu via onnxruntime"), r.stderr
    assert "OpenVINO" not in r.stderr


def test_fixed_buffers_give_what_run_gives(demo_model: tuple[Path, Path]) -> None:
    """FixedBinder (the CUDA-graph path's buffers, bound once and updated in place) on the
    CPU provider: identical arrays to InferenceSession.run, batch after batch."""
    from convlens.engine.runtime_bind import FixedBinder

    model, photos = demo_model
    graph, names, plan = default_graph(model)
    batches = analysis_batches(model, photos, (5, 5, 5))
    feeds = [{C.IN_IMAGE: x, C.IN_TARGETS: plan.targets(len(x))} for x in batches]
    fixed = FixedBinder(graph, names, feeds[0], "cpu")
    plain = open_session(graph, "cpu", runtime="onnxruntime")
    first = fixed.run(feeds[1])
    for f in (feeds[1], feeds[2], feeds[0]):
        for n, a, b in zip(names, fixed.run(f), plain.run(names, f), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=n)
    # results are copies: later batches do not overwrite them
    for n, a, b in zip(names, first, plain.run(names, feeds[1]), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=n)
