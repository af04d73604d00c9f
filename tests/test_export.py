"""The exporter, on real trained models of every head kind, against Keras and TensorFlow.

References are computed here independently of the exporter's own code: Keras
sub-models for activations, ``model.predict`` for predictions, and tf.GradientTape
through the model's own layers for the head gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convlens.engine import contract as C

from conftest import require_tf
from refs import _close, _flat_layers, _images, _ort, _tape_reference, keras_activation

pytestmark = pytest.mark.tf


EXPECTED_HEADS = {
    "gap_dense": ("gap_dense", "softmax", True),
    "class_conv": ("class_conv", "softmax", True),
    "flatten_sigmoid": ("dense", "sigmoid", False),
    "flatten_softmax": ("dense", "softmax", False),
    "nested": ("gap_dense", "softmax", True),
}


@pytest.mark.parametrize("name", list(EXPECTED_HEADS))
def test_every_output_matches_keras(zoo: dict[str, dict[str, Path]], name: str) -> None:
    import keras

    paths = zoo[name]
    spec = C.read_spec(paths["onnx"])
    kind, act, cam = EXPECTED_HEADS[name]
    assert (spec.head.kind, spec.head.activation, spec.head.cam_available) == (kind, act, cam)
    assert spec.head.gradients_available
    assert spec.parity["passed"] and spec.parity["worst"] < 1e-4

    model = keras.models.load_model(paths["keras"], compile=False)
    x = _images(spec)
    targets = np.array([[-1, -2, 0]] * len(x), np.int64)
    got = _ort(paths["onnx"], {C.IN_IMAGE: x, C.IN_TARGETS: targets})

    # predictions: Keras' own predict
    ref = model.predict(x, verbose=0)
    if spec.head.binary_sigmoid:
        ref = np.concatenate([1 - ref, ref], axis=1)
    _close(ref, got[C.OUT_PREDICTIONS])
    assert got[C.OUT_PREDICTIONS].shape == (len(x), spec.num_classes)

    # every exposed conv activation: the model's own layers re-called in order
    layers = {layer.name for layer in _flat_layers(model)}
    for out in spec.activation_outputs:
        exposed = spec.source["exposed_tensors"][out.layer]
        assert exposed in layers
        _close(keras_activation(model, exposed, x), got[out.name])

    # class scores are the pre-activation: softmax/sigmoid of them gives predictions
    s = got[C.OUT_SCORES]
    if act == "softmax":
        e = np.exp(s - s.max(axis=1, keepdims=True))
        _close(e / e.sum(axis=1, keepdims=True), got[C.OUT_PREDICTIONS])
    else:
        _close(1 / (1 + np.exp(-s)), got[C.OUT_PREDICTIONS])

    # targets resolve to ranks (-1 = top class) and plain indices
    order = np.argsort(-got[C.OUT_SCORES], axis=1)
    np.testing.assert_array_equal(got[C.OUT_TARGET_INDICES][:, 0], order[:, 0])
    np.testing.assert_array_equal(got[C.OUT_TARGET_INDICES][:, 1], order[:, 1])
    np.testing.assert_array_equal(got[C.OUT_TARGET_INDICES][:, 2], 0)

    # gradients against tf.GradientTape
    tape = _tape_reference(model, spec, x, got[C.OUT_TARGET_INDICES])
    _close(tape, got[C.OUT_GRADIENTS], tol=1e-4)
    assert np.abs(tape).max() > 0

    # CAM weights are the dense kernel (or identity for class-channel heads)
    if cam:
        w = got[C.OUT_CAM_WEIGHTS]
        if kind == "class_conv":
            np.testing.assert_array_equal(w, np.eye(spec.num_classes, dtype=np.float32))
        else:
            dense = [layer for layer in _flat_layers(model) if type(layer).__name__ == "Dense"][-1]
            np.testing.assert_array_equal(w, dense.get_weights()[0])
            np.testing.assert_array_equal(got[C.OUT_CAM_BIAS], dense.get_weights()[1])
    else:
        assert C.OUT_CAM_WEIGHTS not in got


def test_models_learned_something(zoo: dict[str, dict[str, Path]]) -> None:
    """The zoo is real trained models, not random weights: held-out accuracy over chance."""
    import keras

    from convlens.exporter.demo_data import PHOTOS, TEXTURES, patches

    for name, paths in zoo.items():
        model = keras.models.load_model(paths["keras"], compile=False)
        spec = C.read_spec(paths["onnx"])
        names = TEXTURES if spec.input.channels == 1 else PHOTOS
        if spec.head.binary_sigmoid:
            names = ("chelsea", "coffee")
        x, y = patches(
            names, 40, spec.input.height, rgb=spec.input.channels == 3, split="holdout", seed=11
        )
        x = x.astype("float32") if name == "nested" else x.astype("float32") / 255.0
        p = model.predict(x, verbose=0)
        pred = (p[:, 0] > 0.5).astype(int) if p.shape[1] == 1 else p.argmax(1)
        acc = float((pred == y).mean())
        assert acc > 1.0 / len(names) + 0.15, f"{name}: held-out accuracy {acc:.2f}"


def test_metadata_contract(zoo: dict[str, dict[str, Path]]) -> None:
    spec = C.read_spec(zoo["nested"]["onnx"])
    assert spec.preprocess.kind == "none"  # the model rescales itself
    assert spec.input.color_mode == "rgb" and spec.input.layout == "NHWC"
    assert spec.class_names == ["0", "1", "2"]
    assert spec.cam_layer == "bb_conv2"
    spec = C.read_spec(zoo["gap_dense"]["onnx"])
    assert spec.preprocess.kind == "unit" and spec.input.color_mode == "grayscale"
    # the conv followed by BatchNormalization and ReLU is exposed after its activation
    assert spec.source["exposed_tensors"]["conv2"] == "relu2"
    roles = {o.name: o.role for o in spec.outputs}
    assert roles[C.OUT_GRADIENTS] == C.ROLE_GRADIENTS and roles["act/conv1"] == C.ROLE_ACTIVATION
    parity = json.loads(zoo["gap_dense"]["onnx"].with_suffix(".parity.json").read_text())
    assert parity["passed"] and "gradients_vs_gradienttape" in parity["outputs"]


def test_labels_layers_preprocess_calibration(
    zoo: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    from convlens.exporter.export import export_model

    labels = tmp_path / "labels.txt"
    labels.write_text("brick\ngrass\ngravel\n")
    cal = tmp_path / "cal"
    cal.mkdir()
    import cv2

    from convlens.exporter.demo_data import load_photo

    cv2.imwrite(str(cal / "a.png"), load_photo("brick")[:100, :100])
    cv2.imwrite(str(cal / "b.jpg"), load_photo("grass")[:120, :90])
    r = export_model(
        zoo["gap_dense"]["keras"],
        tmp_path / "m.onnx",
        labels=labels,
        layers=["conv1"],
        preprocess="symmetric",
        calibration=cal,
    )
    spec = r.spec
    assert spec.class_names == ["brick", "grass", "gravel"]
    # the CAM layer is always exposed, besides the chosen ones
    assert [o.layer for o in spec.activation_outputs] == ["conv1", "conv2"]
    assert spec.preprocess.kind == "symmetric" and spec.preprocess.offset == -1.0
    assert spec.parity["source"].startswith("calibration:2")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convlens.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_export_cli_and_inspect(zoo: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    out = tmp_path / "cli.onnx"
    r = _cli("export", str(zoo["flatten_sigmoid"]["keras"]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "head dense" in r.stdout and out.exists()
    r = _cli("inspect", str(out))
    assert r.returncode == 0 and "cam_gradients" in r.stdout and "PASSED" in r.stdout
    r = _cli("inspect", "--json", str(out))
    info = json.loads(r.stdout)
    assert info["spec"]["head"]["binary_sigmoid"] is True
    assert {o["name"] for o in info["outputs"]} >= {"predictions", "scores", "cam_gradients"}


def _bad_models(tmp: Path) -> dict[str, tuple[Path, str]]:
    import keras
    from keras import layers

    text = tmp / "notes.keras"
    text.write_text("this is not a model")
    dense = tmp / "dense.keras"
    keras.Sequential([keras.Input((8, 8, 1)), layers.Flatten(), layers.Dense(2)]).save(dense)
    vector = tmp / "vector.keras"
    keras.Sequential([keras.Input((10,)), layers.Dense(2)]).save(vector)
    return {
        "not a model": (text, "not a Keras model"),
        "no conv": (dense, "no convolution layer"),
        "not an image": (vector, "needs an image input"),
        "missing": (tmp / "nope.keras", "no such file"),
        "empty dir": (tmp, "not a SavedModel"),
    }


def test_bad_models_give_one_line(tmp_path: Path) -> None:
    require_tf()
    for what, (path, needle) in _bad_models(tmp_path).items():
        r = _cli("export", str(path), "-o", str(tmp_path / "x.onnx"))
        assert r.returncode == 2, (what, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("convlens:")]
        assert len(lines) == 1 and needle in lines[0], (what, r.stderr)
        assert "Traceback" not in r.stderr


def test_unsupported_head_is_reported_not_fatal(tmp_path: Path) -> None:
    """Layers without a backward rule on the path from --cam-layer are listed together,
    in the summary too; CAM of the final feature map still exports."""
    require_tf()
    import keras
    from keras import layers

    from convlens.exporter.export import export_loaded

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="c")(inp)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.UpSampling2D(name="up")(x)
    x = layers.Permute((2, 1, 3), name="perm")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inp, out)
    r = export_loaded(model, tmp_path / "u.onnx", cam_layer="c")
    assert not r.spec.head.gradients_available
    problems = r.spec.source["gradient_problems"]
    assert problems == ["up (UpSampling2D)", "perm (Permute)"]  # LayerNormalization has a rule
    assert not r.spec.has_output(C.OUT_GRADIENTS)
    assert r.spec.parity["passed"]
    from convlens.engine.cams import METHODS

    needing = ", ".join(m for m, method in METHODS.items() if method.needs_gradients)
    assert f"{needing} unavailable: no gradient rule for up" in r.summary()
    # the default CAM tensor is what the head pools: every method works there
    d = export_loaded(model, tmp_path / "d.onnx")
    assert d.spec.cam_layer == "perm" and d.spec.head.kind == "gap_dense"
    assert (
        all(why is None for why in d.methods.values())
        and "WARNING" not in d.summary().split("preprocessing")[0]
    )


def test_savedmodel_without_keras_metadata(tmp_path: Path) -> None:
    require_tf()
    import keras
    from keras import layers

    from convlens.exporter.errors import ExportError
    from convlens.exporter.loading import load_keras_model

    m = keras.Sequential(
        [keras.Input((8, 8, 1)), layers.Conv2D(2, 3), layers.GlobalAveragePooling2D()]
    )
    m.export(str(tmp_path / "sm"), verbose=False)
    with pytest.raises(ExportError, match="without Keras layer metadata"):
        load_keras_model(tmp_path / "sm")


def test_keras2_savedmodel(tmp_path: Path) -> None:
    """A tf.keras (Keras 2) SavedModel carries its layers; tf_keras reads it."""
    require_tf()
    import tf_keras
    from tf_keras import layers

    from convlens.exporter.export import export_model

    tf_keras.utils.set_random_seed(0)
    m = tf_keras.Sequential(
        [
            layers.Input((24, 24, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(6, 3, activation="relu", name="last"),
            layers.Flatten(),
            layers.Dense(8, activation="relu"),
            layers.Dense(3, activation="softmax"),
        ]
    )
    m.save(str(tmp_path / "sm"), save_format="tf")
    r = export_model(tmp_path / "sm", tmp_path / "sm.onnx")
    assert r.spec.head.kind == "dense" and r.spec.cam_layer == "last"
    assert r.spec.parity["passed"]
    assert r.spec.parity["outputs"]["gradients_vs_gradienttape"]["score"] < 1e-5
    x = np.random.default_rng(0).random((2, 24, 24, 3), np.float32)
    got = _ort(r.path, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((2, 1), -1, np.int64)})
    _close(m.predict(x, verbose=0), got[C.OUT_PREDICTIONS])


def test_ops_tf2onnx_cannot_convert_are_listed(tmp_path: Path) -> None:
    require_tf()
    import keras
    import tensorflow as tf
    from keras import layers

    from convlens.exporter.errors import ExportError
    from convlens.exporter.export import export_loaded

    class Special(layers.Layer):
        def call(self, x: Any) -> Any:
            return tf.math.digamma(x + 2.0) + tf.math.lgamma(x + 2.0)

    inp = keras.Input((8, 8, 1))
    h = Special(name="special")(layers.Conv2D(2, 3)(inp))
    out = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(h))
    with pytest.raises(
        ExportError,
        match=r"cannot convert these TensorFlow ops: .*(Digamma.*Lgamma|Lgamma.*Digamma)",
    ):
        export_loaded(keras.Model(inp, out), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def _tiny(head: Any, bias: float = 0.0) -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    inp = keras.Input((20, 20, 3))
    x = layers.Conv2D(
        6, 3, activation="relu", name="c", bias_initializer=keras.initializers.Constant(bias)
    )(inp)
    return keras.Model(inp, head(x))


def test_configurations_with_rules_match_gradienttape(tmp_path: Path) -> None:
    """ReLU(max_value), overlapping max pooling and a swish Dense all have rules: the
    exported gradients match tf.GradientTape element by element."""
    require_tf()
    from keras import layers

    from convlens.exporter.export import export_loaded

    cases = {
        "relu6": lambda x: layers.Dense(3, activation="softmax")(
            layers.Flatten()(layers.ReLU(max_value=6.0, name="r6")(layers.MaxPooling2D()(x)))
        ),
        "overlapping": lambda x: layers.Dense(3, activation="softmax")(
            layers.Flatten()(layers.MaxPooling2D(3, strides=2, name="mp")(x))
        ),
        "swish": lambda x: layers.Dense(3, activation="softmax")(
            layers.Dense(4, activation="swish", name="sw")(layers.GlobalAveragePooling2D()(x))
        ),
    }
    for name, head in cases.items():
        r = export_loaded(_tiny(head), tmp_path / f"{name}.onnx", cam_layer="c")
        assert r.spec.head.gradients_available, name
        tape = r.spec.parity["outputs"]["gradients_vs_gradienttape"]
        assert tape["elementwise_rel_l2"] < 1e-5 and tape["score"] < 1e-5, name


def test_configurations_without_rules_export_without_gradients(tmp_path: Path) -> None:
    require_tf()
    from keras import layers

    from convlens.exporter.export import export_loaded

    cases = {
        "dilated": lambda x: layers.Dense(3, activation="softmax")(
            layers.Flatten()(layers.Conv2D(2, 3, dilation_rate=2, name="dil")(x))
        ),
        "squareplus": lambda x: layers.Dense(3, activation="softmax")(
            layers.Dense(4, activation="squareplus", name="sq")(layers.GlobalAveragePooling2D()(x))
        ),
    }
    for name, head in cases.items():
        r = export_loaded(_tiny(head), tmp_path / f"{name}.onnx", cam_layer="c")
        assert not r.spec.head.gradients_available, name
        assert r.spec.source["gradient_problems"], name
        assert r.spec.parity["passed"], name


def test_more_heads_get_cam_and_exact_gradients(tmp_path: Path) -> None:
    """GlobalMaxPooling with ties (dead ReLU channels) matches GradientTape; GAP -> Dense
    (linear) -> Activation(softmax) and GAP(keepdims) -> Flatten -> Dense get CAM."""
    require_tf()
    from keras import layers

    from convlens.exporter.export import export_loaded

    gmp = _tiny(
        lambda x: layers.Dense(3, activation="softmax")(layers.GlobalMaxPooling2D()(x)), bias=-0.3
    )
    r = export_loaded(gmp, tmp_path / "gmp.onnx")
    assert r.spec.parity["outputs"]["gradients_vs_gradienttape"]["score"] < 1e-5
    split = _tiny(
        lambda x: layers.Activation("softmax")(layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    )
    r = export_loaded(split, tmp_path / "split.onnx")
    assert r.spec.head.kind == "gap_dense" and r.spec.head.cam_available
    kd = _tiny(
        lambda x: layers.Dense(3, activation="softmax")(
            layers.Flatten()(layers.GlobalAveragePooling2D(keepdims=True)(x))
        )
    )
    r = export_loaded(kd, tmp_path / "kd.onnx")
    assert r.spec.head.kind == "gap_dense" and r.spec.parity["passed"]


def test_logits_model_reports_probabilities(tmp_path: Path) -> None:
    """A classifier ending in a linear Dense (trained from logits): the engine reports
    softmax probabilities, CAM still comes from the dense weights."""
    require_tf()
    import cv2
    from keras import layers

    from convlens.engine.run import RunOptions, run
    from convlens.exporter.export import export_loaded

    r = export_loaded(
        _tiny(lambda x: layers.Dense(3)(layers.GlobalAveragePooling2D()(x))), tmp_path / "l.onnx"
    )
    assert r.spec.head.activation == "linear" and r.spec.head.kind == "gap_dense"
    (tmp_path / "in").mkdir()
    from convlens.exporter.demo_data import load_photo

    cv2.imwrite(str(tmp_path / "in" / "a.png"), load_photo("coffee")[:, :, ::-1])
    run(r.path, [str(tmp_path / "in")], tmp_path / "o", RunOptions(device="cpu"), progress=False)
    rec = json.loads((tmp_path / "o" / "results.jsonl").read_text().splitlines()[0])
    probs = [p["prob"] for p in rec["predictions"]]
    assert abs(sum(probs) - 1) < 1e-4 and all(0 <= p <= 1 for p in probs)
