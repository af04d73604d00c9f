"""What the analysis file says about itself: the input, preprocessing, class names and
outputs (:class:`~convlens.engine.contract.ModelSpec`), and the metadata message that
carries it."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from convlens import __version__
from convlens.engine import contract as C
from convlens.engine.inspect import dims

from .errors import ExportError
from .families import default_preprocess
from .plan import Plan


def input_spec(model: Any) -> C.InputSpec:
    inputs = model.inputs
    if not inputs or len(inputs) != 1:
        raise ExportError(
            f"the model has {len(inputs or [])} inputs; convlens needs exactly one image input"
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 4:
        raise ExportError(
            f"the model's input has shape {shape}; convlens needs an image input "
            "(batch, height, width, channels)"
        )
    _, h, w, c = shape
    if h is None or w is None:
        raise ExportError(
            f"the model's input size is not fixed {shape}; rebuild it with a fixed "
            "keras.Input(shape=(H, W, C))"
        )
    if c not in (1, 3):
        raise ExportError(
            f"the model's input has {c} channels; convlens reads grayscale (1) or RGB (3) "
            "images in channels-last layout"
        )
    return C.InputSpec(
        name=C.IN_IMAGE,
        height=int(h),
        width=int(w),
        channels=int(c),
        color_mode="grayscale" if c == 1 else "rgb",
    )


def preprocess_for(text: str | None, model: Any, trace: Any) -> tuple[C.Preprocess, str]:
    """The preprocessing and why: the user's, else the recognised family's, else x/255."""
    if text:
        try:
            return C.Preprocess.parse(text), "given with --preprocess"
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
    preset, reason = default_preprocess(model, [c.kind for c in trace.calls[:3]])
    return C.Preprocess.parse(preset), reason


def class_names_for(labels: str | Path | list[str] | None, model: Any, n: int) -> list[str]:
    names: list[str] | None = None
    if isinstance(labels, list):
        names = [str(x) for x in labels]
    elif labels is not None:
        p = Path(labels)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ExportError(f"--labels {p}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ExportError(f"--labels {p}: not a UTF-8 text file") from exc
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        attr = getattr(model, "class_names", None)
        if isinstance(attr, (list, tuple)) and all(isinstance(x, str) for x in attr):
            names = list(attr)
    if names is None:
        return [str(i) for i in range(n)]
    if len(names) != n:
        raise ExportError(f"--labels gives {len(names)} class names but the model has {n} classes")
    return names


def model_spec(
    plan: Plan,
    inp: C.InputSpec,
    pre: C.Preprocess,
    class_names: list[str],
    proto: Any,
    source_path: str,
    keras: Any,
    tf: Any,
) -> C.ModelSpec:
    shapes = {o.name: dims(o) for o in proto.graph.output}
    outputs = [
        C.OutputSpec(C.OUT_PREDICTIONS, C.ROLE_PREDICTIONS, shapes[C.OUT_PREDICTIONS]),
        C.OutputSpec(C.OUT_SCORES, C.ROLE_SCORES, shapes[C.OUT_SCORES]),
    ]
    for e in plan.exposed:
        name = C.ACT_PREFIX + e.name
        outputs.append(C.OutputSpec(name, C.ROLE_ACTIVATION, shapes[name], layer=e.name))
    if plan.gradients_available:
        outputs.append(
            C.OutputSpec(C.OUT_GRADIENTS, C.ROLE_GRADIENTS, shapes[C.OUT_GRADIENTS], plan.cam_layer)
        )
        outputs.append(
            C.OutputSpec(C.OUT_TARGET_INDICES, C.ROLE_TARGET_INDICES, shapes[C.OUT_TARGET_INDICES])
        )
    if plan.cam_weights is not None:
        outputs.append(
            C.OutputSpec(
                C.OUT_CAM_WEIGHTS, C.ROLE_CAM_WEIGHTS, list(plan.cam_weights.shape), plan.cam_layer
            )
        )
        outputs.append(C.OutputSpec(C.OUT_CAM_BIAS, C.ROLE_CAM_BIAS, [len(class_names)]))
    head = C.HeadSpec(
        kind=plan.head_kind,
        activation=plan.activation,
        cam_available=plan.cam_weights is not None,
        gradients_available=plan.gradients_available,
        layers=plan.head_calls,
        binary_sigmoid=plan.binary_sigmoid,
    )
    source = {
        "model": os.path.basename(source_path),
        "convlens": __version__,
        "keras": getattr(keras, "__version__", "?"),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "exposed_tensors": {e.name: e.exposed for e in plan.exposed},
        "gradient_problems": plan.gradient_problems,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return C.ModelSpec(
        format_version=C.FORMAT_VERSION,
        class_names=class_names,
        input=inp,
        preprocess=pre,
        outputs=outputs,
        cam_layer=plan.cam_layer,
        head=head,
        source=source,
    )


def metadata_bytes(spec: C.ModelSpec) -> bytes:
    """The spec as a serialized ModelProto holding only ``metadata_props``: appended to
    a serialized model, protobuf merges it in (a repeated field's entries append), so
    the model itself is never serialized twice."""
    import onnx

    meta = onnx.ModelProto()
    for key, value in ((C.METADATA_KEY, spec.to_json()), (FORMAT_KEY, str(C.FORMAT_VERSION))):
        entry = meta.metadata_props.add()
        entry.key, entry.value = key, value
    return meta.SerializeToString()


FORMAT_KEY = "convlens.format_version"
