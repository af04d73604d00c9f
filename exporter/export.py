"""``export_model``: a trained Keras model becomes one analysis ONNX file.

Steps: load the model; trace it once to plan the export (exposed conv layers, CAM
layer, head kind); build one tf.function returning predictions, class scores, conv
activations and head gradients; convert it with tf2onnx; add the CAM weights as
constant outputs; write everything the engine needs into the metadata; check parity
(Keras and TensorFlow against onnxruntime) and fail loudly past the tolerance.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convlens import __version__
from convlens.engine import contract as C
from convlens.engine.cams import availability
from convlens.engine.results import append_and_replace, atomic_write_bytes
from convlens.engine.tail import tail_problem

from .build import make_function, output_names, probe_gradients
from .convert import add_constant_output, convert
from .errors import ExportError
from .families import recognise
from .loading import load_keras_model
from .parity import check_parity, parity_inputs
from .plan import make_plan
from .spec import class_names_for, input_spec, metadata_bytes, model_spec, preprocess_for
from .tfenv import import_tf
from .trace import Recorder
from .weights import external_view, stream_model

DEFAULT_TOLERANCE = 1e-3  # on max |onnx - reference| / max(1, max |reference|)


@dataclass
class ExportResult:
    path: Path
    parity_path: Path
    spec: C.ModelSpec
    seconds: float
    size_bytes: int
    peak_rss_mb: float = 0.0
    #: why the layers after the CAM tensor cannot be cut out (Ablation-/Recipro-CAM)
    tail_problem: str | None = None

    @property
    def methods(self) -> dict[str, str | None]:
        """CAM method -> None when the engine can run it on this file, else why not."""
        return availability(self.spec, self.tail_problem)

    @property
    def warnings(self) -> list[str]:
        """Unavailable methods, with the reason, and an assumed preprocessing."""
        out = []
        missing: dict[str, list[str]] = {}
        for name, why in self.methods.items():
            if why is not None:
                missing.setdefault(why, []).append(name)
        for why, names in missing.items():
            out.append(f"{', '.join(names)} unavailable: {why}")
        reason = str(self.spec.source.get("preprocess_reason", ""))
        if reason.startswith("assumed"):
            out.append(f"preprocessing {reason}")
        p = self.spec.parity
        if p.get("noisy"):
            out.append(
                f"parity of {', '.join(p['noisy'][:3])}{' ...' if len(p['noisy']) > 3 else ''} "
                f"judged against the model's own noise: TensorFlow itself moves by up to "
                f"{p['noise']:.2g} between a batch and single images, or with the inputs moved "
                "by 1e-6 (float32 rounding amplified through the network: random or "
                "untrained weights?)"
            )
        return out

    def summary(self) -> str:
        """The one line ``convlens export`` prints."""
        s = self.spec
        ok = [m for m, why in self.methods.items() if why is None]
        line = (
            f"wrote {self.path} ({self.size_bytes / 1e6:.2f} MB) in {self.seconds:.1f} s: "
            f"{len(s.activation_outputs)} exposed layers, head {s.head.kind}, "
            f"CAM tensor {s.cam_layer} {_hw(s)}; methods {', '.join(ok) or 'none'}; "
            f"preprocessing {s.preprocess.kind} ({s.source.get('preprocess_reason', '')}); "
            f"parity worst {s.parity.get('worst', 0.0):.2g} (details {self.parity_path})"
        )
        return line + "".join(f"; WARNING {w}" for w in self.warnings)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hw(spec: C.ModelSpec) -> str:
    out = {o.name: o for o in spec.outputs}.get(C.ACT_PREFIX + str(spec.cam_layer))
    return "x".join(str(d) for d in out.shape[1:]) if out else ""


def export_model(
    model_path: str | Path,
    out_path: str | Path,
    *,
    layers: list[str] | None = None,
    cam_layer: str | None = None,
    labels: str | Path | list[str] | None = None,
    preprocess: str | None = None,
    calibration: str | Path | None = None,
    n_calibration: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ExportResult:
    """Export ``model_path`` (.keras, .h5, SavedModel dir) to ``out_path`` (.onnx)."""
    t0 = time.perf_counter()
    tf, keras = import_tf()
    model = load_keras_model(model_path)
    return export_loaded(
        model,
        out_path,
        source_path=str(model_path),
        layers=layers,
        cam_layer=cam_layer,
        labels=labels,
        preprocess=preprocess,
        calibration=calibration,
        n_calibration=n_calibration,
        tolerance=tolerance,
        seed=seed,
        t0=t0,
    )


def export_loaded(
    model: Any,
    out_path: str | Path,
    *,
    source_path: str = "<in memory>",
    layers: list[str] | None = None,
    cam_layer: str | None = None,
    labels: str | Path | list[str] | None = None,
    preprocess: str | None = None,
    calibration: str | Path | None = None,
    n_calibration: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    t0: float | None = None,
) -> ExportResult:
    """Export an already loaded Keras model (see :func:`export_model`)."""
    t0 = time.perf_counter() if t0 is None else t0
    tf, keras = import_tf()
    out = Path(out_path)
    unchecked = out.with_name(f".{out.name}.{os.getpid()}.unchecked")  # before parity
    parity_view = out.with_name(f".{out.name}.{os.getpid()}.view")  # reads unchecked's weights
    inp = input_spec(model)
    recorder = Recorder(model)
    try:
        with recorder.recording() as trace:
            model(np.zeros((1, inp.height, inp.width, inp.channels), np.float32), training=False)
        plan = make_plan(trace, layers, cam_layer)
        probe_gradients(tf, plan, trace)
        pre, pre_reason = preprocess_for(preprocess, model, trace)
        class_names = class_names_for(labels, model, plan.num_classes)
        with_grads = plan.gradients_available
        fn, sig = make_function(
            tf, model, recorder, plan, (inp.height, inp.width, inp.channels), with_grads
        )
        names = output_names(plan, with_grads)
        converted = convert(tf, fn, sig, names)
        proto = converted.proto
        if plan.cam_weights is not None and plan.cam_bias is not None:
            add_constant_output(proto, C.OUT_CAM_WEIGHTS, plan.cam_weights)
            add_constant_output(proto, C.OUT_CAM_BIAS, plan.cam_bias)
            converted.dedupe()  # the CAM weights are the dense kernel itself
        spec = model_spec(plan, inp, pre, class_names, proto, source_path, keras, tf)
        spec.source["preprocess_reason"] = pre_reason
        found = recognise(model)
        spec.source["family"] = found[0].name if found else None
        images, source = parity_inputs(calibration, inp, pre, n_calibration, seed)
        proto.producer_name, proto.producer_version = "convlens", __version__
        del proto.metadata_props[:]
        # the weights are read from the variables as they are written, one at a time;
        # the parity session reads them from that file (through a view of the graph that
        # points at them as external data), which then gets the metadata (holding the
        # parity) appended as a second message and takes its final name
        places: dict[str, tuple[int, int]] = {}
        chunks = stream_model(proto, converted.deferred, places)
        atomic_write_bytes(unchecked, chunks, durable=False)
        view = external_view(proto, converted.deferred, unchecked.name, places)
        # every weight is an initializer here (external data): the tail check reads names
        cut_problem = tail_problem(view, spec) if spec.cam_output else None
        atomic_write_bytes(parity_view, view.SerializeToString(), durable=False)
        del proto, converted, view
        parity = check_parity(
            tf, model, recorder, plan, fn, str(parity_view), images, with_grads, tolerance
        )
    except BaseException:
        unchecked.unlink(missing_ok=True)
        raise
    finally:
        parity_view.unlink(missing_ok=True)
        recorder.restore()
    parity.update(source=source, tolerance=tolerance)
    spec.parity = parity
    parity_path = (
        out.with_name(out.name + ".parity.json")
        if out.suffix != ".onnx"
        else out.with_suffix(".parity.json")
    )
    try:
        atomic_write_bytes(parity_path, json.dumps(parity, indent=2, sort_keys=True).encode())
        if not parity["passed"]:
            failed = {n: parity["outputs"][n] for n in parity["failed"]}
            bad = max(failed.items(), key=lambda kv: kv[1]["score"])
            noise = bad[1].get("reference_noise", 0.0)
            raise ExportError(
                f"parity check failed: output {bad[0]} differs from Keras by "
                f"{bad[1]['max_abs']:.3g} (relative {bad[1]['score']:.3g} > tolerance "
                f"{tolerance:g}, TensorFlow's own noise {noise:.2g}); details in {parity_path}"
            )
        append_and_replace(unchecked, metadata_bytes(spec), out)
    finally:
        unchecked.unlink(missing_ok=True)
    return ExportResult(
        path=out,
        parity_path=parity_path,
        spec=spec,
        seconds=time.perf_counter() - t0,
        size_bytes=out.stat().st_size,
        peak_rss_mb=peak_rss_mb(),
        tail_problem=cut_problem,
    )


def export_plain(model_path: str | Path, out_path: str | Path) -> Path:
    """The baseline: plain tf2onnx export of the model's predictions only."""
    tf, keras = import_tf()
    model = load_keras_model(model_path)
    inp = input_spec(model)
    recorder = Recorder(model)
    try:
        with recorder.recording() as trace:
            model(np.zeros((1, inp.height, inp.width, inp.channels), np.float32), training=False)
        plan = make_plan(trace, None, None)
        fn, sig = make_function(
            tf, model, recorder, plan, (inp.height, inp.width, inp.channels), False, plain=True
        )
        converted = convert(tf, fn, sig, [C.OUT_PREDICTIONS])
        atomic_write_bytes(Path(out_path), stream_model(converted.proto, converted.deferred))
    finally:
        recorder.restore()
    return Path(out_path)


__all__ = ["ExportResult", "export_loaded", "export_model", "export_plain"]
