"""Independent references for the tests: Keras forward passes and tf.GradientTape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convlens.engine import contract as C


def _images(spec: C.ModelSpec, n: int = 6, seed: int = 3) -> np.ndarray:
    """Held-out real photo patches at the model's input size, preprocessed per spec."""
    from convlens.engine.images import Preprocessor
    from convlens.exporter.demo_data import PHOTOS, TEXTURES, patches

    names = TEXTURES if spec.input.channels == 1 else PHOTOS
    x, _ = patches(
        names, n // len(names) + 1, spec.input.height, rgb=True, split="holdout", seed=seed
    )
    pre = Preprocessor(spec.input, spec.preprocess)
    return np.stack([pre(img) for img in x[:n]])


def _ort(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _flat_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(_flat_layers(layer))
        else:
            out.append(layer)
    return out


def _tape_reference(
    model: Any, spec: C.ModelSpec, x: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    """d score_c / d A by tf.GradientTape, re-calling the model's layers on a fresh chain.

    The model is split after the exposed CAM tensor: layers up to it give A, the layers
    after it (the head) are re-applied to A, and the final layer's pre-activation is
    computed from its kernel.  Works for the chain-structured test models (nested ones
    are flattened; their Rescaling stays in front).
    """
    import tensorflow as tf

    exposed = spec.source["exposed_tensors"][spec.cam_layer]
    layers = [layer for layer in _flat_layers(model) if type(layer).__name__ != "InputLayer"]
    names = [layer.name for layer in layers]
    cut = names.index(exposed) + 1
    front, head = layers[:cut], layers[cut:]
    final = head[-1]
    a = tf.constant(x)
    for layer in front:
        a = layer(a, training=False)
    grads = []
    for t in range(classes.shape[1]):
        with tf.GradientTape() as tape:
            tape.watch(a)
            h = a
            for layer in head[:-1]:
                h = layer(h, training=False)
            if type(final).__name__ == "Dense":
                z = tf.matmul(h, final.kernel) + final.bias
            else:  # Activation(softmax) after GAP: scores are its input
                z = h
            if spec.head.binary_sigmoid:
                z = tf.concat([-z, z], axis=1)
            sel = tf.reduce_sum(z * tf.one_hot(classes[:, t], z.shape[1]), axis=1)
        grads.append(tape.gradient(sel, a).numpy())
    return np.stack(grads, axis=1)


def _close(ref: np.ndarray, got: np.ndarray, tol: float = 1e-4) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    assert ref.shape == got.shape
    err = float(np.abs(ref - got).max()) / scale
    assert err < tol, f"max relative error {err:.3g}"


def keras_activation(model: Any, exposed: str, x: np.ndarray) -> np.ndarray:
    """The output of layer ``exposed``, re-calling the model's (flattened) layers in order."""
    h = x
    for layer in _flat_layers(model):
        if type(layer).__name__ == "InputLayer":
            continue
        h = layer(h, training=False)
        if layer.name == exposed:
            return np.asarray(h)
    raise KeyError(exposed)
