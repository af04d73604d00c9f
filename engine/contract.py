"""The analysis-ONNX contract shared by the exporter (writer) and the engine (reader).

An analysis ONNX file is a normal ONNX model whose ``metadata_props`` hold one key,
``convlens``, whose value is a JSON document described by :class:`ModelSpec`.  The
engine reads everything it needs from there and never guesses.

Graph inputs
    ``image``   float32, NHWC, ``(N, H, W, C)``, already preprocessed.
    ``targets`` int64, ``(N, T)``: for every image, the T classes whose class-score
                gradient the graph returns.  A value ``>= 0`` is a class index; a negative
                value ``-r`` means "the r-th highest scoring class" (``-1`` is the top
                prediction).  Only present when the graph exports gradients.

Graph outputs (names are fixed, roles recorded in ``ModelSpec.outputs``)
    ``predictions``      ``(N, C)`` what the Keras model returns (probabilities).
    ``scores``           ``(N, C)`` class scores before the final softmax/sigmoid.
    ``act/<layer>``      ``(N, h, w, k)`` every exposed layer output (one is the CAM tensor).
    ``cam_weights``      ``(k, C)``  constant: CAM channel weights (dense kernel, or identity).
    ``cam_bias``         ``(C,)``    constant: the dense bias (zeros for identity heads).
    ``cam_gradients``    ``(N, T, h, w, k)`` d score[target] / d act[cam_layer].
    ``target_indices``   ``(N, T)`` int64, the class index each ``targets`` entry resolved to.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
METADATA_KEY = "convlens"

# output roles
ROLE_PREDICTIONS = "predictions"
ROLE_SCORES = "scores"
ROLE_ACTIVATION = "activation"
ROLE_CAM_WEIGHTS = "cam_weights"
ROLE_CAM_BIAS = "cam_bias"
ROLE_GRADIENTS = "gradients"
ROLE_TARGET_INDICES = "target_indices"

OUT_PREDICTIONS = "predictions"
OUT_SCORES = "scores"
OUT_CAM_WEIGHTS = "cam_weights"
OUT_CAM_BIAS = "cam_bias"
OUT_GRADIENTS = "cam_gradients"
OUT_TARGET_INDICES = "target_indices"
IN_IMAGE = "image"
IN_TARGETS = "targets"
ACT_PREFIX = "act/"

# Named preprocessing presets: y = ((x_in_channel_order * scale + offset) - mean) / std
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"scale": 1.0, "offset": 0.0, "mean": None, "std": None, "channel_order": "RGB"},
    "unit": {
        "scale": 1.0 / 255.0,
        "offset": 0.0,
        "mean": None,
        "std": None,
        "channel_order": "RGB",
    },
    "symmetric": {
        "scale": 1.0 / 127.5,
        "offset": -1.0,
        "mean": None,
        "std": None,
        "channel_order": "RGB",
    },
    "caffe": {
        "scale": 1.0,
        "offset": 0.0,
        "mean": [103.939, 116.779, 123.68],
        "std": None,
        "channel_order": "BGR",
    },
    "imagenet": {
        "scale": 1.0 / 255.0,
        "offset": 0.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "channel_order": "RGB",
    },
}


MAX_INPUT_SIDE = 16384  # pixels: a model input side beyond this is not an image model's


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ContractError(ValueError):
    """The file is not a (compatible) convlens analysis ONNX."""


@dataclass
class Preprocess:
    """How a decoded 8-bit image becomes the graph's ``image`` input.

    ``y = ((x * scale + offset) - mean) / std`` per channel, after converting to
    ``channel_order`` and resizing to the input size.
    """

    kind: str = "unit"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    mean: list[float] | None = None
    std: list[float] | None = None
    channel_order: str = "RGB"
    resize: str = "stretch"  # resize to (H, W) ignoring aspect ratio, INTER_AREA/INTER_LINEAR

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """Parse a preset name or ``mean_std:m1,m2,m3/s1,s2,s3`` (values on the 0..1 scale)."""
        text = text.strip()
        if text in PRESETS:
            return cls(kind=text, **PRESETS[text])
        if text.startswith("mean_std:"):
            try:
                m, s = text[len("mean_std:") :].split("/")
                mean = [float(v) for v in m.split(",")]
                std = [float(v) for v in s.split(",")]
            except ValueError as exc:
                raise ValueError(
                    f"bad --preprocess {text!r}: expected mean_std:M1,M2,M3/S1,S2,S3"
                ) from exc
            return cls(
                kind="mean_std",
                scale=1.0 / 255.0,
                offset=0.0,
                mean=mean,
                std=std,
                channel_order="RGB",
            )
        raise ValueError(
            f"unknown --preprocess {text!r}: choose one of {', '.join(PRESETS)} "
            "or mean_std:M1,M2,M3/S1,S2,S3"
        )


@dataclass
class InputSpec:
    name: str
    height: int
    width: int
    channels: int
    layout: str = "NHWC"
    color_mode: str = "rgb"  # "rgb" or "grayscale"
    dtype: str = "float32"


@dataclass
class OutputSpec:
    name: str
    role: str
    shape: list[int | str]
    layer: str | None = None


@dataclass
class HeadSpec:
    """What follows the CAM layer.

    kind: ``gap_dense`` (GlobalAveragePooling -> Dense: CAM from the dense weights),
    ``class_conv`` (last conv has one channel per class, then GAP: identity CAM weights),
    ``dense`` (anything else ending in Dense, e.g. Flatten -> Dense -> Dense: Grad-CAM only).
    """

    kind: str
    activation: str  # "softmax", "sigmoid", "linear"
    cam_available: bool
    gradients_available: bool
    layers: list[str] = field(default_factory=list)
    binary_sigmoid: bool = False  # one sigmoid unit presented as two classes [1-p, p]


@dataclass
class ModelSpec:
    format_version: int
    class_names: list[str]
    input: InputSpec
    preprocess: Preprocess
    outputs: list[OutputSpec]
    cam_layer: str | None
    head: HeadSpec
    parity: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    # ---- convenience -------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def output(self, name: str) -> OutputSpec:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def has_output(self, name: str) -> bool:
        return any(o.name == name for o in self.outputs)

    @property
    def activation_outputs(self) -> list[OutputSpec]:
        return [o for o in self.outputs if o.role == ROLE_ACTIVATION]

    @property
    def cam_output(self) -> str | None:
        return None if self.cam_layer is None else ACT_PREFIX + self.cam_layer

    # ---- (de)serialisation ---------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ContractError(
                f"convlens format version {version} is not supported (this convlens reads "
                f"version {FORMAT_VERSION}); re-export the model with `convlens export`"
            )
        try:
            spec = cls(
                format_version=version,
                class_names=list(d["class_names"]),
                input=InputSpec(**d["input"]),
                preprocess=Preprocess(**d["preprocess"]),
                outputs=[OutputSpec(**o) for o in d["outputs"]],
                cam_layer=d.get("cam_layer"),
                head=HeadSpec(**d["head"]),
                parity=d.get("parity", {}),
                source=d.get("source", {}),
            )
        except (KeyError, TypeError) as exc:
            raise ContractError(f"malformed convlens metadata: {exc}") from exc
        spec.check()
        return spec

    def check(self) -> None:
        """Refuse metadata a run could not use, before any image is read: class names
        that do not match the predictions, an input size no image can be resized to, and
        preprocessing constants that are not finite numbers."""
        bad = ContractError
        if not self.class_names or not all(isinstance(n, str) for n in self.class_names):
            raise bad("malformed convlens metadata: class_names must be a non-empty list of names")
        if self.has_output(OUT_PREDICTIONS):
            dims = self.output(OUT_PREDICTIONS).shape
            if dims and isinstance(dims[-1], int) and dims[-1] != self.num_classes:
                raise bad(
                    f"malformed convlens metadata: {self.num_classes} class names for "
                    f"{dims[-1]} predictions"
                )
        inp = self.input
        for what, v in (("height", inp.height), ("width", inp.width)):
            if not _is_int(v) or not 1 <= v <= MAX_INPUT_SIDE:
                raise bad(
                    f"malformed convlens metadata: input {what} {v!r} (1 to {MAX_INPUT_SIDE})"
                )
        if inp.channels not in (1, 3):
            raise bad(f"malformed convlens metadata: input channels {inp.channels!r} (1 or 3)")
        pre = self.preprocess
        values = [pre.scale, pre.offset, *(pre.mean or []), *(pre.std or [])]
        if not all(_is_number(v) and math.isfinite(v) for v in values):
            raise bad("malformed convlens metadata: preprocessing constants must be finite numbers")
        if any(s == 0 for s in pre.std or []):
            raise bad("malformed convlens metadata: a preprocessing std of 0")
        for vec in (pre.mean, pre.std):
            if vec is not None and len(vec) not in (1, 3):
                raise bad(
                    f"malformed convlens metadata: {len(vec)} preprocessing mean/std values "
                    "(1 or 3)"
                )
        if pre.channel_order not in ("RGB", "BGR"):
            raise bad(f"malformed convlens metadata: channel order {pre.channel_order!r}")

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"convlens metadata is not valid JSON: {exc}") from exc
        return cls.from_dict(d)


NOT_ANALYSIS_HINT = (
    "make one with `convlens export MODEL.keras -o MODEL.onnx` "
    "(needs the [export] extra: pip install 'convlens[export]')"
)


def read_spec(path: str | Path) -> ModelSpec:
    """Read the ModelSpec of an analysis ONNX file without loading its weights."""
    from . import onnxproto

    p = Path(path)
    if not p.exists():
        raise ContractError(f"{p}: no such file")
    if p.is_dir():
        raise ContractError(f"{p}: is a directory, not an ONNX file")
    if not p.is_file():  # a FIFO would block the open, a device never ends
        raise ContractError(f"{p}: not a regular file, not an ONNX file")
    try:
        model = onnxproto.load(p, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX input
        raise ContractError(
            f"{p}: not an ONNX file ({type(exc).__name__}); {NOT_ANALYSIS_HINT}"
        ) from exc
    props = {m.key: m.value for m in model.metadata_props}
    if METADATA_KEY not in props:
        raise ContractError(
            f"{p}: an ONNX file, but not a convlens analysis model (no '{METADATA_KEY}' "
            f"metadata); {NOT_ANALYSIS_HINT}"
        )
    return ModelSpec.from_json(props[METADATA_KEY])
