"""The timed methods.  Each returns a :class:`Timing`; TensorFlow is imported only by the
Keras methods, so the onnxruntime and convlens rows are measured without it in memory.

Rows (see bench.py): ``notebook`` (1), ``keras`` (2), ``ort_plain`` (3, rate I),
``ort_analysis`` (3a), ``decode`` (D); the convlens rows (4, 4', 4g) and the peers are in
bench_rivals.py.

And, run as a script, the CAM methods (bench_cams.py: what each measures)::

    python benchmarks/bench_methods.py cams [--models small,vgg] [--images 64] [--repeats 3]
    python benchmarks/bench_methods.py peers [--models small] [--images 16] [--repeats 2]

``cams``: milliseconds per image of every CAM method the model serves; ``peers``: img/s
of Score-CAM and Ablation-CAM against pytorch-grad-cam's, same architecture and images.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from bench_data import CAFFE_MEAN_BGR, ModelConfig, keras_preprocess

BATCH = 32


@dataclass
class Timing:
    images: int
    seconds: list[float]  # one per repeat
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / statistics.median(self.seconds)


def repeat(fn: Callable[[], int], repeats: int) -> tuple[int, list[float]]:
    """Run ``fn`` ``repeats`` times; ``fn`` returns the number of images it handled."""
    seconds, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        seconds.append(time.perf_counter() - t0)
    return n, seconds


# ---------------------------------------------------------------------------------------
# Keras side (1 and 2)
# ---------------------------------------------------------------------------------------


def _tf() -> tuple[Any, Any]:
    from convlens.exporter.tfenv import import_tf  # sets TF_ENABLE_ONEDNN_OPTS=0 first

    return import_tf()


def _conv_layers(keras: Any, model: Any) -> list[Any]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def tap_model(keras: Any, model: Any, taps: Sequence[Any]) -> Any:
    """``keras.Model(inputs, [tap outputs..., predictions])``.  A loaded Sequential's
    ``layer.output`` may belong to another call graph than ``model.outputs`` (Keras 3:
    the gradient is then None), so a Sequential is traced again layer by layer."""
    if not isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, [*(t.output for t in taps), model.outputs[0]])
    x = inp = keras.Input(model.inputs[0].shape[1:])
    found = {}
    for layer in model.layers:
        x = layer(x)
        found[id(layer)] = x
    return keras.Model(inp, [*(found[id(t)] for t in taps), x])


def _linear_head(keras: Any, model: Any) -> Callable[[Any], Any]:
    """Make the last layer linear (tf-keras-vis' ReplaceToLinear by hand): Grad-CAM uses the
    class score before softmax / sigmoid.  Returns the activation that was removed."""
    last = model.layers[-1]
    act = last.activation
    last.activation = keras.activations.linear
    return act


def _gap_weights(keras: Any, model: Any) -> np.ndarray | None:
    """The Dense kernel ``(k, C)`` after a GlobalAveragePooling2D, else None."""
    layers = model.layers
    if (
        len(layers) >= 2
        and isinstance(layers[-2], keras.layers.GlobalAveragePooling2D)
        and isinstance(layers[-1], keras.layers.Dense)
    ):
        return np.asarray(layers[-1].kernel)
    return None


def _targets(tf: Any, logits: Any) -> Any:
    """Top-1 class score per image (the single logit of a one-unit sigmoid head)."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    top = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.gather(logits, top, axis=1, batch_dims=1)


def make_gradcam(tf: Any, keras: Any, model: Any) -> Callable[[Any], tuple[Any, Any]]:
    """Batched Grad-CAM (Selvaraju et al.) with tf.GradientTape, as tf-keras-vis computes
    it: ``alpha = mean_ij dS/dA``, ``ReLU(sum_k alpha_k A_k)``, upsampled, min-max scaled.

    Returns ``step(x) -> (probabilities, maps (N, H, W))``, for the top-1 class."""
    head = _linear_head(keras, model)
    conv = _conv_layers(keras, model)[-1]
    grad_model = tap_model(keras, model, [conv])
    size = model.inputs[0].shape[1:3]

    def step(x: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            acts, logits = grad_model(x, training=False)
            score = _targets(tf, logits)
        grads = tape.gradient(score, acts)  # each image's score depends on its acts only
        alpha = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", acts, alpha))
        cam = tf.image.resize(cam[..., None], size)[..., 0]
        lo = tf.reduce_min(cam, axis=(1, 2), keepdims=True)
        hi = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return head(logits), (cam - lo) / tf.maximum(hi - lo, 1e-7)

    return step


def _dataset(tf: Any, files: Sequence[Path], cfg: ModelConfig) -> Any:
    """tf.data: read, decode_jpeg, resize (area), preprocess; parallel, batched, prefetched."""
    mean = tf.constant(CAFFE_MEAN_BGR)

    def load(path: Any) -> Any:
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        x = tf.image.resize(img, (cfg.size, cfg.size), method="area")
        return x[..., ::-1] - mean if cfg.preprocess == "caffe" else x / 255.0

    ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(BATCH).prefetch(tf.data.AUTOTUNE)


def keras_batched(keras_path: Path, files: Sequence[Path], cfg: ModelConfig) -> int:
    """Row 2: load the model; tf.data decoding; batched predict + Grad-CAM in one
    tf.function (predictions come from the same forward pass as the maps)."""
    tf, keras = _tf()
    model = keras.models.load_model(keras_path, compile=False)
    fn = tf.function(make_gradcam(tf, keras, model), reduce_retracing=True)
    n = 0
    for x in _dataset(tf, files, cfg):
        probs, cams = fn(x)
        top = np.argsort(-probs.numpy(), axis=1)[:, :3]  # top-3, as the engine reports
        maps = cams.numpy()
        n += min(len(top), len(maps))
    return n


# -- 1: the notebook recipe ---------------------------------------------------------------


def _channel_grid(acts: np.ndarray, per_row: int = 16) -> np.ndarray:
    """The classic tutorial grid: each channel ``(x - mean) / std * 64 + 128``, clipped."""
    size, n = acts.shape[0], acts.shape[-1]
    rows = max(1, n // per_row)
    grid = np.zeros((size * rows, per_row * size))
    for r in range(rows):
        for c in range(per_row):
            if r * per_row + c >= n:
                break
            ch = acts[:, :, r * per_row + c].astype(np.float64)
            ch = (ch - ch.mean()) / (ch.std() + 1e-5) * 64 + 128
            grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = np.clip(ch, 0, 255)
    return grid


def _save_grid(plt: Any, grid: np.ndarray, size: int, title: str, path: Path) -> None:
    scale = 1.0 / size
    plt.figure(figsize=(scale * grid.shape[1], scale * grid.shape[0]))
    plt.title(title)
    plt.grid(False)
    plt.imshow(grid, aspect="auto", cmap="viridis")
    plt.savefig(path)
    plt.close()


def _overlay(path: Path, cam: np.ndarray, out: Path) -> None:
    """The tutorial's heatmap: upsample to the photo, JET colour map, 0.4 over the photo."""
    img = cv2.imread(str(path))
    heat = cv2.resize(cam.astype(np.float32), (img.shape[1], img.shape[0]))
    heat = np.uint8(255 * np.clip(heat / max(float(heat.max()), 1e-7), 0, 1))
    blend = cv2.applyColorMap(heat, cv2.COLORMAP_JET) * 0.4 + img
    cv2.imwrite(str(out), np.clip(blend, 0, 255).astype(np.uint8))


def notebook(keras_path: Path, files: Sequence[Path], cfg: ModelConfig, outdir: Path) -> int:
    """Row 1: one image at a time: activation model predict, a matplotlib grid per conv
    layer saved as PNG, CAM from the dense weights (GAP head) or Grad-CAM (eager tape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf, keras = _tf()
    model = keras.models.load_model(keras_path, compile=False)
    convs = _conv_layers(keras, model)
    act_model = tap_model(keras, model, convs)  # every conv output + the predictions
    weights = _gap_weights(keras, model)
    gradcam = make_gradcam(tf, keras, model) if weights is None else None
    for path in files:
        img = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(cfg.size,) * 2))
        x = keras_preprocess(img.astype(np.uint8), cfg)[None]
        acts = act_model.predict(x, verbose=0)
        d = outdir / path.stem
        d.mkdir(parents=True, exist_ok=True)
        for layer, a in zip(convs, acts[:-1], strict=True):
            grid = _channel_grid(a[0])
            _save_grid(plt, grid, a.shape[1], layer.name, d / f"{layer.name}.png")
        if weights is not None:  # CAM: the dense weights of the top class
            cam = np.maximum(acts[-2][0] @ weights[:, int(np.argmax(acts[-1][0]))], 0)
        elif gradcam is not None:  # Grad-CAM, eager, one image
            cam = gradcam(tf.constant(x))[1].numpy()[0]
        _overlay(path, cam, d / "cam.jpg")
    return len(files)


# ---------------------------------------------------------------------------------------
# onnxruntime and decoding alone (3, 3a, D)
# ---------------------------------------------------------------------------------------


def _preprocessor(analysis_onnx: Path) -> Any:
    from convlens.engine import contract as C
    from convlens.engine.images import Preprocessor

    spec = C.read_spec(analysis_onnx)
    return Preprocessor(spec.input, spec.preprocess)


def decode_all(files: Sequence[Path], pre: Any, workers: int | None = None) -> Iterator[Any]:
    """read_image + Preprocessor on a pool of threads, like the engine's decoding."""
    from convlens.engine.images import read_image

    with cf.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        yield from pool.map(lambda f: pre(read_image(f)), files)


def decode(analysis_onnx: Path, files: Sequence[Path]) -> int:
    """Row D: decoding + preprocessing alone, all cores."""
    pre = _preprocessor(analysis_onnx)
    return sum(1 for _ in decode_all(files, pre))


def preloaded(analysis_onnx: Path, files: Sequence[Path]) -> np.ndarray:
    pre = _preprocessor(analysis_onnx)
    return np.stack(list(decode_all(files, pre)))


def _feeds(sess: Any, x: np.ndarray, k: int) -> tuple[list[str], dict[str, Any]]:
    """Every output but the constant CAM weights; top-k targets when the graph takes them."""
    from convlens.engine import contract as C

    const = {C.OUT_CAM_WEIGHTS, C.OUT_CAM_BIAS}
    names = [o.name for o in sess.get_outputs() if o.name not in const]
    feeds: dict[str, Any] = {sess.get_inputs()[0].name: x}
    if k:
        feeds[C.IN_TARGETS] = np.tile(-(np.arange(k, dtype=np.int64) + 1), (len(x), 1))
    return names, feeds


def _inputs(sess: Any) -> list[str]:
    return [i.name for i in sess.get_inputs()]


def ort_batches(model: Path, x: np.ndarray) -> Callable[[], int]:
    """Rows 3 / 3a: a function running ``model`` over ``x`` in batches of 32, fetching
    every output (the analysis ONNX: activations, statistics, gradients of the top 3
    classes, as the engine's default ``top_k``)."""
    from convlens.engine import contract as C
    from convlens.engine.runtime import open_session

    sess = open_session(model, "cpu").session
    k = min(3, C.read_spec(model).num_classes) if C.IN_TARGETS in _inputs(sess) else 0
    runs = [_feeds(sess, x[i : i + BATCH], k) for i in range(0, len(x), BATCH)]
    sess.run(*runs[0])  # warm-up, not timed

    def go() -> int:
        for names, feeds in runs:
            sess.run(names, feeds)
        return len(x)

    return go


# ---------------------------------------------------------------------------------------
# the CAM methods (bench_cams.py, bench_peers.py)
# ---------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import platform

    import bench_data as data

    p = argparse.ArgumentParser(
        description="cams: ms per image of every CAM method; peers: Score-CAM and "
        "Ablation-CAM img/s against pytorch-grad-cam's"
    )
    p.add_argument("what", choices=["cams", "peers"])
    p.add_argument("--models", default=None, help="comma-separated: small, vgg")
    p.add_argument("--images", type=int, default=None, help="photos per model")
    p.add_argument("--repeats", type=int, default=None, help="median over repeats")
    p.add_argument(
        "--slow-images", type=int, default=4, help="cams: photos the whole-model methods run on"
    )
    args = p.parse_args(argv)
    cams = args.what == "cams"
    models = (args.models or ("small,vgg" if cams else "small")).split(",")
    images = args.images or (64 if cams else 16)
    repeats = args.repeats or (3 if cams else 2)

    def load(model: str, n: int) -> np.ndarray:
        data.ensure_model(model)
        return preloaded(data.model_files(model).analysis, data.set_files(data.image_set(n, n)))

    if cams:
        from bench_cams import cam_costs, cam_table

        results = [
            cam_costs(data.model_files(m).analysis, load(m, images), repeats, args.slow_images)
            for m in models
        ]
        print(cam_table(results))
    else:
        from bench_peers import main_peers

        print(main_peers(models, images, repeats, load))
    print(
        f"\n{images} photos per model, batches of {BATCH}, median of {repeats} repeats"
        + (f" (whole-model methods: the first {args.slow_images} photos, once)" if cams else "")
        + f"; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}"
    )
    if cams:
        for r in results:
            for m, why in r.unavailable.items():
                print(f"{r.model}: {m} n/a: {why}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main())
