"""Benchmark fixtures: real photographs, image sets and models, cached under ``.cache``.

* Photos: random crops / flips / rescales of scikit-image's bundled photographs, 640x480
  JPEG quality 90.  Photo ``i`` depends only on ``(SEED, i)``, so asking for more photos
  never changes the earlier ones.
* Image sets: directories of symlinks to the photos (``n300``: the first 300; ``cyc1000``:
  1000 links reusing the photos cyclically, for the scaling runs).
* Models (random weights, seeded): ``small`` (the seed-style 150x150 convnet, Flatten ->
  Dense head, so Grad-CAM) and ``vgg`` (VGG16 at 160x160, GAP -> Dense(5), so CAM too),
  saved as ``.keras``, exported as the analysis ONNX and the plain tf2onnx ONNX.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
SEED = 20240611
PHOTO_SIZE = (640, 480)  # width, height
JPEG_QUALITY = 90
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)

# scikit-image's colour photographs that load offline (the files in skimage/data/)
_COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
_COLOUR += ("immunohistochemistry",)
_GREY = ("camera", "brick", "grass", "gravel", "moon", "coins")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    size: int  # input height = width
    preprocess: str  # convlens preset, mirrored by the Keras baselines
    notebook_images: int  # images for the (slow) notebook recipe
    labels: tuple[str, ...] | None = None


MODELS: dict[str, ModelConfig] = {
    "small": ModelConfig("small", 150, "unit", notebook_images=8),
    "vgg": ModelConfig(
        "vgg",
        160,
        "caffe",
        notebook_images=2,
        labels=("daisy", "dandelion", "roses", "sunflowers", "tulips"),
    ),
}


# ---------------------------------------------------------------------------------------
# photos and image sets
# ---------------------------------------------------------------------------------------


def _sources() -> list[np.ndarray]:
    """The bundled photographs as RGB uint8 (greyscale ones replicated to RGB)."""
    from skimage import data

    left, right, _ = data.stereo_motorcycle()
    images = [np.asarray(getattr(data, name)()) for name in _COLOUR + _GREY]
    out = []
    for img in [*images, left, right]:
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3]).astype(np.uint8))
    return out


def _make_photo(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rescale (covering 640x480), crop and horizontal flip of ``src``."""
    w, h = PHOTO_SIZE
    sh, sw = src.shape[:2]
    scale = max(w / sw, h / sh) * rng.uniform(1.0, 1.6)
    nw, nh = max(w, round(sw * scale)), max(h, round(sh * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    big = cv2.resize(src, (nw, nh), interpolation=interp)
    x0 = int(rng.integers(0, nw - w + 1))
    y0 = int(rng.integers(0, nh - h + 1))
    out = big[y0 : y0 + h, x0 : x0 + w]
    return out[:, ::-1] if rng.random() < 0.5 else out


def ensure_photos(n: int) -> list[Path]:
    """The first ``n`` benchmark photos (made once, then reused)."""
    folder = CACHE / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:05d}.jpg" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        sources = _sources()
        for i in missing:
            rng = np.random.default_rng([SEED, i])
            src = sources[int(rng.integers(len(sources)))]
            bgr = cv2.cvtColor(np.ascontiguousarray(_make_photo(src, rng)), cv2.COLOR_RGB2BGR)
            tmp = paths[i].with_suffix(".tmp.jpg")
            cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            tmp.replace(paths[i])
    return paths


def image_set(n: int, n_photos: int) -> Path:
    """A directory of ``n`` symlinks to the first ``n_photos`` photos, reused cyclically."""
    photos = ensure_photos(min(n, n_photos))
    folder = CACHE / "sets" / (f"n{n}" if n <= n_photos else f"cyc{n}_of{n_photos}")
    links = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    if folder.is_dir() and len(os.listdir(folder)) == n and all(p.exists() for p in links):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i, link in enumerate(links):
        link.symlink_to(os.path.relpath(photos[i % len(photos)], folder))
    return folder


def set_files(folder: Path, limit: int | None = None) -> list[Path]:
    files = sorted(folder.glob("img_*.jpg"))
    return files[:limit] if limit is not None else files


# ---------------------------------------------------------------------------------------
# models (TensorFlow is imported only here, lazily)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    keras: Path
    analysis: Path
    plain: Path


def exporter_stamp() -> str:
    """A hash of the exporter's code: the ONNX files are made again when it changes."""
    root = HERE.parent
    h = hashlib.sha1()
    for f in sorted([*(root / "exporter").glob("*.py"), root / "engine" / "contract.py"]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def model_files(name: str) -> ModelFiles:
    d = CACHE / "models"
    e = d / f"export-{exporter_stamp()}"
    return ModelFiles(d / f"{name}.keras", e / f"{name}.onnx", e / f"{name}.plain.onnx")


def _build_small(keras: Any, cfg: ModelConfig) -> Any:
    L = keras.layers
    blocks: list[Any] = []
    for filters in (32, 64, 128, 128):
        blocks += [L.Conv2D(filters, 3, activation="relu"), L.MaxPooling2D(2)]
    head = [L.Flatten(), L.Dense(512, activation="relu"), L.Dense(1, activation="sigmoid")]
    return keras.Sequential([keras.Input((cfg.size, cfg.size, 3)), *blocks, *head], name="small")


def _build_vgg(keras: Any, cfg: ModelConfig) -> Any:
    base = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(cfg.size, cfg.size, 3)
    )
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base.output)
    n = len(cfg.labels or ()) or 5
    out = keras.layers.Dense(n, activation="softmax", name="predictions")(x)
    return keras.Model(base.input, out, name="vgg16_gap")


def keras_preprocess(rgb: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The Keras-side preprocessing matching the export's preset (``unit`` or ``caffe``)."""
    x = rgb.astype(np.float32)
    if cfg.preprocess == "caffe":  # keras.applications.vgg16.preprocess_input
        return x[..., ::-1] - CAFFE_MEAN_BGR
    return x / 255.0


def _calibrate_head(keras: Any, model: Any, cfg: ModelConfig, spread: float = 8.0) -> None:
    """Rescale the last Dense layer so that predictions on the photos are confident and
    varied, as a trained model's are (random weights give near-uniform probabilities, and
    the report draws activation grids for every low-confidence image)."""
    head = model.layers[-1]
    feats_model = keras.Model(model.inputs, head.input)
    photos = [cv2.imread(str(p))[:, :, ::-1] for p in ensure_photos(32)]
    size = (cfg.size, cfg.size)
    x = np.stack(
        [keras_preprocess(cv2.resize(p, size, interpolation=cv2.INTER_AREA), cfg) for p in photos]
    )
    kernel, bias = (np.asarray(v) for v in head.get_weights())
    z = np.asarray(feats_model.predict(x, verbose=0)) @ kernel  # (N, C)
    scale = spread / max(float((z - z.mean(axis=0)).std()), 1e-12)
    head.set_weights([kernel * scale, (-z.mean(axis=0) * scale).astype(bias.dtype)])


_BUILDERS: dict[str, Callable[[Any, ModelConfig], Any]] = {
    "small": _build_small,
    "vgg": _build_vgg,
}


def ensure_model(name: str, rebuild: bool = False) -> dict[str, float]:
    """Build, save and export model ``name`` unless cached; returns seconds per step.

    The export's parity check is calibrated on benchmark photos: with its default noise
    images the random-weight ``small`` model fails the gradient parity (see RESULTS.md).
    """
    import time

    from convlens.exporter.export import export_model, export_plain
    from convlens.exporter.tfenv import import_tf

    cfg, files = MODELS[name], model_files(name)
    files.analysis.parent.mkdir(parents=True, exist_ok=True)
    for old in files.keras.parent.glob("export-*"):  # exports made by older exporter code
        if old != files.analysis.parent:
            shutil.rmtree(old)
    took: dict[str, float] = {}
    if rebuild or not files.keras.exists():
        t0 = time.perf_counter()
        _, keras = import_tf()
        keras.utils.set_random_seed(SEED)
        model = _BUILDERS[name](keras, cfg)
        _calibrate_head(keras, model, cfg)
        model.save(files.keras)
        took["build"] = time.perf_counter() - t0
    if rebuild or not files.analysis.exists():
        t0 = time.perf_counter()
        labels = list(cfg.labels) if cfg.labels else None
        calibration = image_set(8, 8)
        export_model(
            files.keras,
            files.analysis,
            preprocess=cfg.preprocess,
            labels=labels,
            calibration=calibration,
        )
        took["export"] = time.perf_counter() - t0
    if rebuild or not files.plain.exists():
        t0 = time.perf_counter()
        export_plain(files.keras, files.plain)
        took["export_plain"] = time.perf_counter() - t0
    return took
