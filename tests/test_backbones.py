"""keras.applications backbones: one model per family, random weights, small inputs.

For each, the export's CAM tensor is the final feature map (what the head pools), its
methods are all five for a GAP head and the gradient ones otherwise, and the engine's
maps from the ONNX outputs equal references computed in Keras alone: a Grad-CAM from
tf.GradientTape through a Keras sub-model (the standard recipe), and for GAP heads a CAM
from the classifier's own kernel.  Earlier layers chosen with --cam-layer get exact
Grad-CAM through residual, dense-block and pooling paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from backbones import EARLIER, build, earlier_layer_gradcam, pearson, photos

from convlens.engine import contract as C
from convlens.engine.cams import METHODS

from conftest import require_tf
from refs import _ort

pytestmark = pytest.mark.tf

# what a GAP head serves (every method) and what any other head serves (all but those
# that need the classifier's weights), from the registry
ALL_METHODS = list(METHODS)
GRADIENT_METHODS = [m for m, method in METHODS.items() if not method.needs_weights]

# family -> (architecture, form, px, head kind, preprocessing); slow ones marked below
FAMILIES: dict[str, tuple[str, str, int, str, str]] = {
    "MobileNet": ("MobileNet", "top", 64, "gap_dense", "symmetric"),  # 1x1 conv classifier
    "MobileNetV2": ("MobileNetV2", "tune", 64, "gap_dense", "symmetric"),
    "MobileNetV3": ("MobileNetV3Small", "top", 64, "dense", "none"),  # conv head, hard_swish
    "EfficientNet": ("EfficientNetB0", "tune", 64, "gap_dense", "none"),  # Normalization
    "EfficientNetV2": ("EfficientNetV2B0", "top", 64, "gap_dense", "none"),
    "DenseNet": ("DenseNet121", "tune", 64, "gap_dense", "imagenet"),
    "Xception": ("Xception", "top", 71, "gap_dense", "symmetric"),
    "ResNet": ("ResNet50", "tune", 64, "gap_dense", "caffe"),
    "ResNetV2": ("ResNet50V2", "top", 64, "gap_dense", "symmetric"),
    "VGG": ("VGG16", "top", 64, "dense", "caffe"),  # Flatten -> Dense(4096) x2
    "InceptionV3": ("InceptionV3", "top", 107, "gap_dense", "symmetric"),
    "ConvNeXt": ("ConvNeXtTiny", "top", 64, "dense", "none"),  # GAP -> LayerNorm -> Dense
    "NASNet": ("NASNetMobile", "tune", 64, "gap_dense", "symmetric"),
    "InceptionResNetV2": ("InceptionResNetV2", "tune", 107, "gap_dense", "symmetric"),
}
SLOW = {"ConvNeXt", "NASNet", "InceptionResNetV2", "InceptionV3"}


def _pooled_tensor(model: Any, form: str) -> tuple[Any, Any, tuple[int, ...]]:
    """(sub-model giving [A, the last layer's input], scores as a function of those,
    A's shape) from the Keras model alone: A is what the head pools."""
    import keras

    if form == "tune":
        base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        dense = model.get_layer("classes")

        def head(a: Any) -> Any:
            x = keras.ops.mean(a, axis=(1, 2))
            return keras.ops.matmul(x, dense.kernel) + dense.bias

        sub = keras.Model(base.inputs, [base.output, base.output])
        return sub, lambda a, _: head(a), tuple(base.output.shape[1:])
    pool = [
        layer
        for layer in model.layers
        if type(layer).__name__ in ("GlobalAveragePooling2D", "Flatten")
        and len(layer.input.shape) == 4
        and layer.input.shape[1] * layer.input.shape[2] > 1
    ][-1]
    last = model.layers[-1]
    sub = keras.Model(model.inputs, [pool.input, last.input])

    def scores(a: Any, last_in: Any) -> Any:
        if type(last).__name__ == "Dense":
            return keras.ops.matmul(last_in, last.kernel) + last.bias
        return last_in  # Activation(softmax): its input is the scores

    return sub, scores, tuple(pool.input.shape[1:])


def tape_gradcam(model: Any, form: str, x: np.ndarray, classes: np.ndarray) -> tuple[Any, Any]:
    """(A, dS/dA) by tf.GradientTape through a Keras sub-model: the Keras Grad-CAM recipe."""
    import tensorflow as tf

    sub, scores, _ = _pooled_tensor(model, form)
    grads = []
    a_out = None
    for t in range(classes.shape[1]):
        with tf.GradientTape() as tape:
            a, last_in = sub(tf.constant(x), training=False)
            tape.watch(a)
            z = scores(a, last_in)
            sel = tf.reduce_sum(z * tf.one_hot(classes[:, t], z.shape[1]), axis=1)
        grads.append(tape.gradient(sel, a).numpy())
        a_out = a.numpy()
    return a_out, np.stack(grads, axis=1)


def _params() -> list[Any]:
    return [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]


@pytest.mark.parametrize("family", _params())
def test_family_exports_with_exact_maps(family: str, tmp_path: Path) -> None:
    require_tf()
    from convlens.exporter.export import export_loaded

    arch, form, size, head_kind, preprocess = FAMILIES[family]
    model = build(arch, form, size)
    r = export_loaded(model, tmp_path / "m.onnx")
    spec = r.spec
    assert spec.parity["passed"], spec.parity
    assert spec.source["family"] == family
    assert spec.preprocess.kind == preprocess
    assert spec.head.kind == head_kind
    expected = ALL_METHODS if head_kind == "gap_dense" else GRADIENT_METHODS
    assert [m for m, why in r.methods.items() if why is None] == expected
    warnings = [w for w in r.summary().split("; WARNING ")[1:]]
    assert warnings == ([] if head_kind == "gap_dense" else [r.warnings[0]])
    assert all(w.startswith("cam unavailable: the head after") for w in warnings)

    # the CAM tensor is the final feature map: the tensor the head pools, h*w > 1
    _, _, pooled = _pooled_tensor(model, form)
    cam_out = spec.output(C.ACT_PREFIX + str(spec.cam_layer))
    assert tuple(cam_out.shape[1:]) == pooled and pooled[0] * pooled[1] > 1

    x = photos(spec)
    got = _ort(r.path, {C.IN_IMAGE: x, C.IN_TARGETS: np.array([[-1, -2]] * len(x), np.int64)})
    classes = got[C.OUT_TARGET_INDICES]
    acts = got[cam_out.name]
    a_ref, g_ref = tape_gradcam(model, form, x, classes)
    np.testing.assert_allclose(acts, a_ref, rtol=1e-4, atol=1e-4 * float(np.abs(a_ref).max()))

    # Grad-CAM (Selvaraju et al.): ReLU(sum_k mean_ij(dS/dA_k) A_k), from Keras alone
    alpha = g_ref.mean(axis=(2, 3))
    ref_map = np.maximum(np.einsum("nhwk,ntk->nthw", a_ref, alpha), 0)
    ours = METHODS["gradcam"].compute(acts, grads=got[C.OUT_GRADIENTS], classes=classes)
    scale = float(np.abs(ref_map).max()) or 1.0
    np.testing.assert_allclose(ours, ref_map, atol=2e-4 * scale)
    for n in range(len(x)):
        for t in range(classes.shape[1]):
            if ref_map[n, t].max() > 1e-6 * scale:
                assert pearson(ours[n, t], ref_map[n, t]) > 0.9999

    if head_kind == "gap_dense":
        # CAM (Zhou et al.): sum_k w_k^c A_k with the classifier's own kernel
        lin = model.layers[-1] if form == "tune" else _classifier(model)
        kernel = np.asarray(lin.kernel).reshape(-1, np.asarray(lin.kernel).shape[-1])
        ref_cam = np.maximum(np.einsum("nhwk,knt->nthw", a_ref, kernel[:, classes]), 0)
        cam = METHODS["cam"].compute(acts, weights=got[C.OUT_CAM_WEIGHTS], classes=classes)
        np.testing.assert_allclose(cam, ref_cam, atol=1e-4 * (float(ref_cam.max()) or 1.0))


def _classifier(model: Any) -> Any:
    """The last Dense or 1x1 Conv2D of an include_top model."""
    return [layer for layer in model.layers if type(layer).__name__ in ("Dense", "Conv2D")][-1]


# --- earlier layers chosen with --cam-layer -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", list(EARLIER))
def test_earlier_layer_gradcam_is_exact(family: str, tmp_path: Path) -> None:
    """Grad-CAM at a layer inside the backbone: the gradient runs back through residual
    Adds, dense-block Concatenates, convolutions (transposed), BN and max pooling."""
    require_tf()
    fig = earlier_layer_gradcam(*EARLIER[family], tmp_path)
    assert fig["min_r"] > 0.9999 and fig["max_err"] < 2e-4, fig
