"""Exporter pieces on small models: graph-following exposures, --cam-layer, the
activation derivative table, tie-proof gradient parity, Normalization constants and
the keras.applications preprocessing defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from backbones import build

from convlens.engine import contract as C

from conftest import require_tf
from refs import _close, _ort

pytestmark = pytest.mark.tf


def test_every_activation_derivative_matches_gradienttape() -> None:
    """Each entry of the table against tf.GradientTape through Keras' own function."""
    require_tf()
    import keras
    import tensorflow as tf

    from convlens.exporter.activations import ACTIVATIONS, activation_grad

    z = tf.constant(np.linspace(-7.5, 7.5, 3 * 41, dtype=np.float32).reshape(3, 41) + 0.013)
    g = tf.constant(np.random.default_rng(0).standard_normal((3, 2, 41)).astype(np.float32))
    for name in ACTIVATIONS:
        if name == "linear":
            continue
        fn = keras.activations.get(name)
        ref = []
        for t in range(2):
            with tf.GradientTape() as tape:
                tape.watch(z)
                y = fn(z)
                loss = tf.reduce_sum(y * g[:, t])
            ref.append(tape.gradient(loss, z).numpy())
        got = activation_grad(tf, name, z, fn(z), g).numpy()
        np.testing.assert_allclose(got, np.stack(ref, axis=1), atol=2e-5, err_msg=name)


def test_gradient_parity_tolerates_ties_and_catches_wrong_gradients() -> None:
    from convlens.exporter.parity import gradient_diff

    rng = np.random.default_rng(0)
    a = rng.random((2, 4, 4, 3)).astype(np.float32)
    g = rng.standard_normal((2, 1, 4, 4, 3)).astype(np.float32)
    a[0, 0, 1, 2] = a[0, 0, 0, 2]  # a tie in a 2x2 max-pool window
    moved = g.copy()  # the window's gradient routed to the other, equally correct cell
    moved[0, 0, 0, 1, 2], moved[0, 0, 0, 0, 2] = g[0, 0, 0, 0, 2], 0.0
    moved[0, 0, 0, 1, 2] += g[0, 0, 0, 1, 2]
    tie = gradient_diff(g, moved, a, a)
    assert tie["score"] < 1e-6 and tie["elementwise_rel_l2"] > 1e-2
    assert gradient_diff(g, g * 1.01, a, a)["score"] > 1e-3  # scaled
    shifted = np.roll(g, 1, axis=2)  # routed to cells that are not the max
    assert gradient_diff(g, shifted, a, a)["score"] > 1e-3
    wrong_cell = g.copy()
    wrong_cell[0, 0, 3, 3, 1], wrong_cell[0, 0, 2, 2, 1] = g[0, 0, 2, 2, 1], g[0, 0, 3, 3, 1]
    assert gradient_diff(g, wrong_cell, a, a)["score"] > 1e-3


def _branchy(path: Path) -> Any:
    """Two conv branches whose BN/ReLU run after both convs in execution order."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(2)
    inp = keras.Input((24, 24, 3))
    a = layers.Conv2D(4, 3, padding="same", name="conv_a")(inp)
    b = layers.Conv2D(4, 3, padding="same", name="conv_b")(inp)
    a = layers.ReLU(name="relu_a")(layers.BatchNormalization(name="bn_a")(a))
    b = layers.ReLU(name="relu_b")(layers.BatchNormalization(name="bn_b")(b))
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.Conv2D(6, 3, strides=2, name="conv_c")(x)
    x = layers.Activation("gelu", name="gelu_c")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, layers.Dense(3, activation="softmax", name="out")(x))
    model.save(path)
    return model


def test_exposures_follow_the_graph_and_cam_layer_paths(tmp_path: Path) -> None:
    require_tf()
    import keras

    from convlens.exporter.errors import ExportError
    from convlens.exporter.export import export_loaded

    model = _branchy(tmp_path / "b.keras")
    # BatchNormalization with non-trivial statistics, so "after BN" is visible
    for name in ("bn_a", "bn_b"):
        bn = model.get_layer(name)
        bn.set_weights([w + 0.3 * (i + 1) for i, w in enumerate(bn.get_weights())])
    r = export_loaded(model, tmp_path / "b.onnx")
    exposed = r.spec.source["exposed_tensors"]
    assert exposed["conv_a"] == "relu_a" and exposed["conv_b"] == "relu_b"
    assert r.spec.cam_layer == "conv_c" and exposed["conv_c"] == "gelu_c"
    x = np.random.default_rng(0).random((2, 24, 24, 3)).astype(np.float32)
    got = _ort(r.path, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((2, 1), -1, np.int64)})
    sub = keras.Model(model.inputs, [model.get_layer("relu_a").output])
    _close(np.asarray(sub(x)), got["act/conv_a"])

    # any 4-D layer, by name; gradients back through Concatenate, BN and a conv
    r2 = export_loaded(model, tmp_path / "cat.onnx", cam_layer="cat")
    assert r2.spec.cam_layer == "cat" and r2.spec.head.gradients_available
    tape = r2.spec.parity["outputs"]["gradients_vs_gradienttape"]
    assert tape["elementwise_rel_l2"] < 1e-5

    with pytest.raises(ExportError) as err:
        export_loaded(model, tmp_path / "x.onnx", cam_layer="relu_aa")
    msg = str(err.value)
    assert "\n" not in msg and "relu_a" in msg and len(msg) < 250


def test_cam_layer_inside_a_nested_model_by_path(tmp_path: Path) -> None:
    require_tf()
    from convlens.exporter.errors import ExportError
    from convlens.exporter.export import export_loaded

    model = build("MobileNetV2", "tune", 64)
    r = export_loaded(
        model, tmp_path / "m.onnx", cam_layer="mobilenetv2_1.00_64/block_13_expand_relu"
    )
    # named by its conv, whose exposed activation (after BN and ReLU) it is
    assert r.spec.cam_layer == "block_13_expand"
    assert r.spec.source["exposed_tensors"]["block_13_expand"] == "block_13_expand_relu"
    assert r.spec.parity["outputs"]["gradients_vs_gradienttape"]["score"] < 1e-4
    with pytest.raises(ExportError, match="try one of: .*out_relu"):
        export_loaded(model, tmp_path / "x.onnx", cam_layer="nope")


def test_normalization_constants_become_initializers(tmp_path: Path) -> None:
    """A keras Normalization layer's mean/variance: no extra graph inputs, same output."""
    require_tf()
    import keras
    import onnx
    from keras import layers

    from convlens.exporter.export import export_loaded

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3000.0, 2500.0, 2000.0])(inp)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    model = keras.Model(
        inp, layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    )
    r = export_loaded(model, tmp_path / "n.onnx")
    assert r.spec.preprocess.kind == "none"
    names = [i.name for i in onnx.load(str(r.path)).graph.input]
    assert names == [C.IN_IMAGE, C.IN_TARGETS]
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    got = _ort(r.path, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((3, 1), -1, np.int64)})
    _close(model.predict(x, verbose=0), got[C.OUT_PREDICTIONS])


def test_preprocessing_defaults_of_keras_applications() -> None:
    require_tf()
    import keras
    from keras import layers

    from convlens.exporter.families import default_preprocess

    def first_kinds(model: Any) -> list[str]:
        from convlens.exporter.trace import layer_kind, leaf_operations

        return [layer_kind(op) for _, op in leaf_operations(model)][:3]

    expect = {
        ("ResNet50", "tune"): "caffe",
        ("VGG16", "top"): "caffe",
        ("ResNet50V2", "top"): "symmetric",
        ("MobileNetV2", "tune"): "symmetric",
        ("DenseNet121", "top"): "imagenet",
        ("EfficientNetB0", "tune"): "none",
        ("MobileNetV3Small", "top"): "none",
        ("ConvNeXtTiny", "tune"): "none",
    }
    for (arch, form), preset in expect.items():
        model = build(arch, form, 64)
        got, reason = default_preprocess(model, first_kinds(model))
        assert got == preset, (arch, form, got, reason)
        assert not reason.startswith("assumed")
    plain = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(2, 3), layers.Flatten()])
    got, reason = default_preprocess(plain, first_kinds(plain))
    assert got == "unit" and reason.startswith("assumed x/255")
    # no built-in scaling: the family's own preprocess_input
    v2 = keras.applications.EfficientNetV2B0(
        weights=None, input_shape=(64, 64, 3), include_preprocessing=False
    )
    assert default_preprocess(v2, first_kinds(v2))[0] == "symmetric"


def test_parity_catches_a_wrong_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted graph with one weight off by 2 %: the export is refused (the reference's
    own noise, image by image against the batch, is ~1e-7 on a sane model)."""
    require_tf()
    from onnx import numpy_helper

    import convlens.exporter.export as E
    from convlens.exporter.errors import ExportError
    from convlens.exporter.weights import Deferred

    model = _branchy(tmp_path / "b.keras")
    real = E.convert

    def wrong(*args: Any, **kw: Any) -> Any:  # the largest weight, deferred or not
        converted = real(*args, **kw)
        init = max(converted.proto.graph.initializer, key=lambda i: numpy_helper.to_array(i).size)
        sizes = {n: int(np.prod(d.shape)) for n, d in converted.deferred.items()}
        if sizes and max(sizes.values()) > numpy_helper.to_array(init).size:
            name = max(sizes, key=lambda n: sizes[n])
            converted.deferred[name] = Deferred.of(converted.deferred[name].value() * 1.02)
        else:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.02, init.name))
        return converted

    monkeypatch.setattr(E, "convert", wrong)
    with pytest.raises(ExportError, match=r"parity check failed: .*TensorFlow's own noise"):
        E.export_loaded(model, tmp_path / "w.onnx")
    monkeypatch.setattr(E, "convert", real)
    ok = E.export_loaded(model, tmp_path / "r.onnx")
    assert ok.spec.parity["passed"] and not ok.spec.parity["noisy"]


def test_weights_enter_the_graph_once_and_nested_functions_still_freeze(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared convolution read twice is held out of tf2onnx once (the variable's
    values, not a frozen copy per read); a layer whose variables go through a nested
    tf.function takes TensorFlow's own freezing.  Both exports equal Keras."""
    require_tf()
    import keras
    import tensorflow as tf
    from keras import layers

    from convlens.exporter import convert, weights
    from convlens.exporter.export import export_loaded

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(inp)  # 1,728 values
    shared = layers.Conv2D(64, 3, padding="same", activation="relu", name="shared")
    x = shared(shared(x))  # one 3x3x64x64 kernel (36,864 values), read twice
    x = layers.Conv2D(128, 3, padding="same", name="big")(x)  # 73,728 values
    model = keras.Model(
        inp, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    )
    seen: list[dict[str, Any]] = []
    fast = convert._frozen_graph_def

    def spy(tf_: Any, concrete: Any) -> Any:
        out = fast(tf_, concrete)
        graph_def, held = out[0], out[3]
        reads = [n for n in graph_def.node if n.op == "ReadVariableOp"]
        assert not reads, "every variable read became a constant or a held-out input"
        seen.append(dict(held))
        return out

    monkeypatch.setattr(convert, "_frozen_graph_def", spy)
    r = export_loaded(model, tmp_path / "shared.onnx")
    big = [w.numpy() for w in model.weights if int(np.prod(w.shape)) >= weights.HELD_OUT_ELEMENTS]
    held = [d.read() for d in seen[0].values()] if seen else []
    assert len(seen) == 1 and len(big) == 3 and len(held) == 3  # the shared kernel once
    for w in big:
        assert sum(h.shape == w.shape and np.array_equal(h, w) for h in held) == 1
    x = np.random.default_rng(0).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
    got = _ort(r.path, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((2, 1), -1, np.int64)})
    _close(model.predict(x, verbose=0), got[C.OUT_PREDICTIONS])

    @tf.function
    def scaled(v: Any, w: Any) -> Any:
        return v * w

    class Scale(layers.Layer):
        def build(self, shape: Any) -> None:
            self.w = self.add_weight(shape=(shape[-1],), initializer="random_uniform")

        def call(self, v: Any) -> Any:
            return scaled(v, self.w.value)  # the tf.Variable under the Keras one

    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(8, 3, activation="relu")(Scale()(inp))
    nested = keras.Model(
        inp, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    )
    fallbacks: list[int] = []
    slow = convert._converted_graph_def
    monkeypatch.setattr(convert, "_converted_graph_def", lambda *a: fallbacks.append(1) or slow(*a))
    monkeypatch.setattr(convert, "_frozen_graph_def", fast)
    r = export_loaded(nested, tmp_path / "nested.onnx")
    assert fallbacks, "the nested function's variable took TensorFlow's freezing"
    y = np.random.default_rng(1).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
    got = _ort(r.path, {C.IN_IMAGE: y, C.IN_TARGETS: np.full((2, 1), -1, np.int64)})
    _close(nested.predict(y, verbose=0), got[C.OUT_PREDICTIONS])
