"""Retrain and re-export the embedded default model, and rewrite the demo photographs.

    python -m convlens.exporter.train_demo            # needs the [export] extra

The model classifies the texture of a grayscale photograph patch: brick, grass or gravel
(scikit-image's public-domain sample photographs, see demo_data).  Its head is
GlobalAveragePooling -> Dense, so every CAM method applies.  The demo photographs are
crops of the held-out bottom quarter of each photograph (never seen in training), plus
"mixed" photographs that put two textures side by side, where a class activation map
should light up the half that shows its class.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from convlens.pipeline import demo_paths

from .demo_data import HOLDOUT, TEXTURES, load_photo, patches

SIZE = 64
DEMO_DIR = demo_paths()[0].parent  # convlens/demo, in a wheel as in the source tree


def build_model(keras: object) -> object:
    from keras import layers

    k = keras
    inp = k.Input((SIZE, SIZE, 1), name="patch")  # type: ignore[attr-defined]
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(len(TEXTURES), activation="softmax", name="texture")(x)
    return k.Model(inp, out, name="textures")  # type: ignore[attr-defined]


def write_photos(dest: Path, seed: int = 7) -> list[Path]:
    """Held-out crops (JPEG, assorted sizes) per class, and side-by-side mixes."""
    import cv2

    rng = np.random.default_rng(seed)
    written = []
    held = {}
    for name in TEXTURES:
        img = load_photo(name)
        cut = int(img.shape[0] * HOLDOUT)
        held[name] = img[cut:]  # 128 x 512
        (dest / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            side = int(rng.integers(96, 128))
            x0 = int(rng.integers(0, img.shape[1] - side))
            crop = held[name][:side, x0 : x0 + side]
            big = cv2.resize(crop, (side * 2, side * 2), interpolation=cv2.INTER_CUBIC)
            p = dest / name / f"{name}_{i + 1}.jpg"
            cv2.imwrite(str(p), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
            written.append(p)
    (dest / "mixed").mkdir(parents=True, exist_ok=True)
    pairs = [("brick", "grass"), ("grass", "gravel"), ("gravel", "brick")]
    for a, b in pairs:
        left = held[a][:128, 0:128]
        right = held[b][:128, 256:384]
        both = np.concatenate([left, right], axis=1)
        both = cv2.resize(both, (512, 256), interpolation=cv2.INTER_CUBIC)
        p = dest / "mixed" / f"{a}_left_{b}_right.jpg"
        cv2.imwrite(str(p), both, [cv2.IMWRITE_JPEG_QUALITY, 90])
        written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=600)
    args = ap.parse_args(argv)

    from .export import export_loaded
    from .tfenv import import_tf

    tf, keras = import_tf()
    keras.utils.set_random_seed(0)
    t0 = time.perf_counter()
    x, y = patches(TEXTURES, args.per_class, SIZE, seed=0)
    xh, yh = patches(TEXTURES, 100, SIZE, split="holdout", seed=1)
    model = build_model(keras)
    model.compile(  # type: ignore[attr-defined]
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x / 255.0, y, epochs=args.epochs, batch_size=32, verbose=2)  # type: ignore[attr-defined]
    _, acc = model.evaluate(xh / 255.0, yh, verbose=0)  # type: ignore[attr-defined]
    train_s = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    photos = args.out / "photos"
    write_photos(photos)
    result = export_loaded(
        model,
        args.out / "textures.onnx",
        source_path="textures.keras",
        labels=list(TEXTURES),
        preprocess="unit",
        calibration=photos,
    )
    info = {
        "classes": list(TEXTURES),
        "input": [SIZE, SIZE, 1],
        "train_patches": int(len(y)),
        "holdout_patches": int(len(yh)),
        "holdout_accuracy": round(float(acc), 4),
        "epochs": args.epochs,
        "train_seconds": round(train_s, 1),
        "export_seconds": round(result.seconds, 1),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    (args.out / "textures.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
