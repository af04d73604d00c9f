"""Small real models of every head kind, trained in seconds on real photo patches.

Used by the exporter, engine and report tests.  Each builder trains on patches of
scikit-image's public-domain texture / photo images (see convlens.exporter.demo_data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SIZE = 32


def _data(
    rgb: bool, n: int = 160, names: tuple[str, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    from convlens.exporter.demo_data import PHOTOS, TEXTURES, patches

    names = names or (PHOTOS if rgb else TEXTURES)
    x, y = patches(names, n, SIZE, rgb=rgb, seed=1)
    return x.astype("float32") / 255.0, y


def _fit(model: Any, x: np.ndarray, y: np.ndarray, loss: str, epochs: int = 3) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def gap_dense(path: Path) -> Path:
    """Conv -> GlobalAveragePooling -> Dense(softmax), grayscale, Functional, .keras."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 1), name="pixels")
    x = layers.Conv2D(8, 3, activation="relu", padding="same", name="conv1")(inp)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(16, 3, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(momentum=0.8, name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2)(x)
    out = layers.Dense(3, activation="softmax", name="classes")(x)
    model = keras.Model(inp, out, name="gap_dense")
    _fit(model, *_data(False, n=300), "sparse_categorical_crossentropy", epochs=10)
    model.save(path)
    return path


def class_conv(path: Path) -> Path:
    """Last conv has one channel per class -> GAP -> softmax (no Dense), Sequential, .keras."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            layers.Conv2D(8, 3, activation="relu", name="c1"),
            layers.MaxPooling2D(),
            layers.SeparableConv2D(16, 3, activation="relu", padding="same", name="sep2"),
            layers.Conv2D(3, 1, name="class_maps"),
            layers.GlobalAveragePooling2D(),
            layers.Activation("softmax"),
        ],
        name="class_conv",
    )
    _fit(model, *_data(False, n=300), "sparse_categorical_crossentropy", epochs=10)
    model.save(path)
    return path


def flatten_sigmoid(path: Path) -> Path:
    """Seed-style: conv/pool blocks -> Flatten -> Dense -> Dense(1, sigmoid), legacy .h5."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.DepthwiseConv2D(3, activation="relu", name="dw"),
            layers.Conv2D(16, 3, activation="relu", name="last_conv"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(1, activation="sigmoid"),
        ],
        name="flatten_sigmoid",
    )
    x, y = _data(True, names=("chelsea", "coffee"))
    _fit(model, x, y.astype("float32"), "binary_crossentropy")
    model.save(path)
    return path


def flatten_softmax(path: Path) -> Path:
    """Conv/pool -> Flatten -> Dense -> Dense(softmax), RGB, Functional, .keras."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, activation="relu", name="b1")(inp)
    x = layers.MaxPooling2D(padding="same")(x)
    x = layers.Conv2D(16, 3, activation="relu", name="b2")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(24, activation="tanh")(x)
    out = layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out, name="flatten_softmax")
    _fit(model, *_data(True), "sparse_categorical_crossentropy")
    model.save(path)
    return path


def nested(path: Path) -> Path:
    """A Functional backbone nested inside a Functional model, GAP -> Dense head."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    b_in = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, activation="relu", padding="same", name="bb_conv1")(b_in)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, activation="relu", padding="same", name="bb_conv2")(x)
    backbone = keras.Model(b_in, x, name="backbone")
    inp = keras.Input((SIZE, SIZE, 3))
    y = layers.Rescaling(1.0 / 255)(inp)
    y = backbone(y)
    y = layers.GlobalAveragePooling2D()(y)
    out = layers.Dense(3, activation="softmax", name="head")(y)
    model = keras.Model(inp, out, name="nested")
    x_, y_ = _data(True)
    _fit(model, x_ * 255.0, y_, "sparse_categorical_crossentropy")
    model.save(path)
    return path


BUILDERS = {
    "gap_dense": (gap_dense, ".keras"),
    "class_conv": (class_conv, ".keras"),
    "flatten_sigmoid": (flatten_sigmoid, ".h5"),
    "flatten_softmax": (flatten_softmax, ".keras"),
    "nested": (nested, ".keras"),
}
