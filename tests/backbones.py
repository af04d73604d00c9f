"""keras.applications backbones in the two forms people export (random weights).

- ``top``: the architecture with its own top, ``include_top=True, classes=10``;
- ``tune``: the fine-tune pattern, ``inputs -> base(include_top=False) ->
  GlobalAveragePooling2D -> Dropout -> Dense(5, softmax)`` with the base nested.

Used by tests/test_backbones.py and benchmarks/coverage.py.
"""

from __future__ import annotations

from typing import Any

# the smallest input each architecture accepts whose final feature map is still > 1x1
MIN_SIZE = {"InceptionV3": 107, "InceptionResNetV2": 107, "NASNetMobile": 64, "Xception": 71}


def architectures() -> list[str]:
    """Every constructor keras.applications has in the Keras version in use."""
    import keras

    return sorted(n for n in dir(keras.applications) if n[0].isupper())


def build(arch: str, form: str, size: int, seed: int = 0) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
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
