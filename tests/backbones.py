"""keras.applications backbones in the two forms people export (random weights).

- ``top``: the architecture with its own top, ``include_top=True, classes=10``;
- ``tune``: the fine-tune pattern, ``inputs -> base(include_top=False) ->
  GlobalAveragePooling2D -> Dropout -> Dense(5, softmax)`` with the base nested.

Used by tests/test_backbones.py and benchmarks/coverage.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# the smallest input each architecture accepts whose final feature map is still > 1x1
MIN_SIZE = {"InceptionV3": 107, "InceptionResNetV2": 107, "NASNetMobile": 64, "Xception": 71}


def architectures() -> list[str]:
    """Every constructor keras.applications has in the Keras version in use."""
    import keras

    return sorted(n for n in dir(keras.applications) if n[0].isupper())


def build(arch: str, form: str, size: int, seed: int = 0) -> Any:
    """The model in that form, random weights."""
    import keras

    keras.utils.set_random_seed(seed)
    return _build(keras, arch, form, size)


def _build(keras: Any, arch: str, form: str, size: int) -> Any:
    ctor = getattr(keras.applications, arch)
    shape = (size, size, 3)
    if form == "top":
        return ctor(weights=None, input_shape=shape, classes=10)
    if form != "tune":
        raise ValueError(form)
    base = ctor(weights=None, include_top=False, input_shape=shape)
    inp = keras.Input(shape, name="image_in")
    x = base(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    out = keras.layers.Dense(5, activation="softmax", name="classes")(x)
    return keras.Model(inp, out, name=f"{arch.lower()}_tuned")


def photos(spec: Any, n: int = 3) -> np.ndarray:
    """Real photographs (the bundled demo photos), preprocessed as the export says."""
    from convlens.engine.images import Preprocessor, discover, read_image
    from convlens.pipeline import demo_paths

    files = discover([str(demo_paths()[1])]).files
    pre = Preprocessor(spec.input, spec.preprocess)
    return np.stack([pre(read_image(f)) for f in files[:: len(files) // n][:n]])


# family: (arch, form, px, --cam-layer as the user writes it, the layer's name)
EARLIER = {
    "ResNet": ("ResNet50", "tune", 64, "resnet50/conv4_block6_out", "conv4_block6_out"),
    "DenseNet": ("DenseNet121", "tune", 64, "conv4_block24_concat", "conv4_block24_concat"),
    "VGG": ("VGG16", "top", 64, "block4_conv3", "block4_conv3"),
}


def earlier_layer_gradcam(
    arch: str, form: str, size: int, cam_layer: str, name: str, out_dir: Path
) -> dict[str, Any]:
    """Export with ``--cam-layer``, then compare the engine's Grad-CAM from the ONNX
    outputs with one from tf.GradientTape through a Keras sub-model (the Keras
    Grad-CAM recipe): the worst per-map Pearson r and max error / max map."""
    import time

    import keras
    import tensorflow as tf

    from convlens.engine import contract as C
    from convlens.engine.cams import METHODS
    from convlens.exporter.export import export_loaded

    model = build(arch, form, size)
    t0 = time.perf_counter()
    r = export_loaded(model, out_dir / "m.onnx", cam_layer=cam_layer)
    seconds = time.perf_counter() - t0
    spec = r.spec
    assert spec.parity["passed"] and spec.head.gradients_available
    assert spec.cam_layer == name
    x = photos(spec)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    feeds = {C.IN_IMAGE: x, C.IN_TARGETS: np.array([[-1]] * len(x), np.int64)}
    outs = [C.ACT_PREFIX + name, C.OUT_GRADIENTS, C.OUT_TARGET_INDICES]
    acts, grads, classes = sess.run(outs, feeds)
    if form == "tune":
        base = model.layers[1]
        sub = keras.Model(base.inputs, [base.get_layer(name).output, base.output])
        dense = model.get_layer("classes")
    else:
        sub = keras.Model(model.inputs, [model.get_layer(name).output, model.layers[-1].input])
        dense = model.layers[-1]
    with tf.GradientTape() as tape:
        a, h = sub(tf.constant(x), training=False)
        if form == "tune":
            h = keras.ops.mean(h, axis=(1, 2))
        z = keras.ops.matmul(h, dense.kernel) + dense.bias
        sel = tf.reduce_sum(z * tf.one_hot(classes[:, 0], z.shape[1]), axis=1)
    g = tape.gradient(sel, a).numpy()[:, None]
    a = a.numpy()
    ref = np.maximum(np.einsum("nhwk,ntk->nthw", a, g.mean(axis=(2, 3))), 0)
    ours = METHODS["gradcam"].compute(acts, grads=grads, classes=classes)
    rs = [pearson(ours[n, 0], ref[n, 0]) for n in range(len(x))]
    return {
        "family": arch,
        "cam_layer": cam_layer,
        "shape": tuple(int(d) for d in acts.shape[1:]),
        "path_layers": len(spec.head.layers),
        "min_r": min(rs),
        "max_err": float(np.abs(ours - ref).max() / ref.max()),
        "export_s": seconds,
    }


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two maps; 1 when both are constant and equal (nothing to rank)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])
